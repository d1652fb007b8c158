//! A pipelining HTTP/1.1 client for `http://` targets: the live and replay
//! send path.
//!
//! Why: on loopback or a LAN, the cost of a proxied request is dominated by
//! the kernel's per-send work (a TCP segment, its delivery, and waking the
//! receiver), not by user space. hyper's client sends one request per
//! connection at a time, so every copy costs one `writev` and one `recv` on
//! its own. Here the requests that are waiting for a target when its
//! connection task runs are written with one `writev` (HTTP/1.1 pipelining),
//! and their answers are read together: one segment and one wake-up carry
//! many requests. See docs/performance.md ("End to end").
//!
//! Connections per target: a request joins the requests that a connection
//! has queued and not yet written (they go out in the same `writev`, and
//! nothing unanswered is ahead of them), else takes an idle connection, else
//! opens a new one up to [`PREFERRED_CONNS`], else is pipelined behind the
//! least loaded connection that is making progress. The writer yields once
//! before it writes, so the requests that the tasks ready at that moment
//! submit go out together. A connection whose oldest request has waited
//! [`STALL`] without an answer gets no new requests (more connections are
//! opened, up to [`MAX_CONNS`]), so one slow or hung request delays at most
//! the requests already queued behind it.
//!
//! Failures: when a connection ends (EOF, error, `Connection: close`, the
//! oldest request's deadline), its oldest unanswered request gets the reason
//! (`Io` if it was wholly written, as hyper's client would report it;
//! `Timeout`), and the requests behind it, which the target has not answered
//! and, after a close, will not, get [`PipeErrorKind::NotSent`]: the caller
//! sends them again on another connection (at most twice; delivery is
//! at-least-once, and `X-Request-Id` lets the target drop a duplicate). A
//! request whose caller has gone (timeout, `secondary_wait`) before it is
//! written is not written.

use std::collections::VecDeque;
use std::io::IoSlice;
use std::mem::MaybeUninit;
use std::sync::atomic::{AtomicBool, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::{Buf, Bytes, BytesMut};
use http::StatusCode;
use http::header::{HeaderMap, HeaderName, HeaderValue};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::tcp::{OwnedReadHalf, OwnedWriteHalf};
use tokio::net::{TcpSocket, TcpStream};
use tokio::sync::{mpsc, oneshot};

use super::MAX_ANSWER_BODY;

/// Connections opened before requests are pipelined. Sized from the e2e
/// benchmark (64 client connections, 4 KiB bodies, proxy at half a core):
/// see docs/performance.md.
pub const PREFERRED_CONNS: usize = 4;
/// Hard bound on connections per target.
pub const MAX_CONNS: usize = 256;
/// Requests queued or in flight on one connection before another is preferred.
const MAX_DEPTH: usize = 64;
/// Most requests written with one `writev`.
const MAX_BATCH: usize = 64;
/// A connection whose oldest request has waited this long gets no new requests.
const STALL: Duration = Duration::from_millis(200);
/// Largest answer head accepted.
const MAX_HEAD: usize = 64 << 10;
/// Most bytes of a chunked answer body held while it is read: room for
/// the framing (sizes, extensions, trailers) of up to [`MAX_ANSWER_BODY`]
/// of data in small chunks.
const MAX_CHUNKED_BUFFER: usize = 4 * MAX_ANSWER_BODY + MAX_HEAD;
/// Most answer headers parsed.
const MAX_HEADERS: usize = 100;

/// Why a request got no answer.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PipeErrorKind {
    Connect,
    Io,
    Timeout,
    /// Not written, or the connection closed in an orderly way before any
    /// byte of its answer: send it again.
    NotSent,
    /// Given up by [`Pipe::abandon`] (shutdown): not sent again.
    Abandoned,
}

#[derive(Debug, thiserror::Error)]
#[error("{kind:?}: {detail}")]
pub struct PipeError {
    pub kind: PipeErrorKind,
    pub detail: String,
}

impl PipeError {
    fn new(kind: PipeErrorKind, detail: impl Into<String>) -> Self {
        PipeError {
            kind,
            detail: detail.into(),
        }
    }
}

/// An answer as received.
#[derive(Debug)]
pub struct RawAnswer {
    pub status: StatusCode,
    /// The answer's head (status line and header lines) as received and
    /// validated; [`head_headers`] makes the end-to-end header map from it,
    /// only for an answer that is relayed to a client.
    pub head: Bytes,
    /// `None` when the body was larger than [`MAX_ANSWER_BODY`].
    pub body: Option<Bytes>,
}

type Reply = oneshot::Sender<Result<RawAnswer, PipeError>>;

/// One request: its encoded head and its body, written back to back.
struct Job {
    head: Bytes,
    body: Bytes,
    deadline: Instant,
    reply: Reply,
}

/// A request written and waiting for its answer.
struct Pending {
    deadline: Instant,
    reply: Reply,
}

/// The connections of one target.
pub struct Pipe {
    host: String,
    port: u16,
    connect_timeout: Duration,
    epoch: Instant,
    /// Open connections and the queues of their tasks (a task ends once its
    /// queue's sender is dropped and its answers are in).
    conns: Mutex<Vec<(Arc<Conn>, mpsc::UnboundedSender<Job>)>>,
    /// Set by [`Pipe::abandon`]: every request from then on fails at once.
    abandoned: AtomicBool,
    /// The target closed a connection after its first answer (an HTTP/1.0
    /// server, or one with keep-alive off): requests are not pipelined,
    /// since every request behind the first would find its connection
    /// closed. Cleared when a connection answers a second request.
    one_answer_per_conn: Arc<AtomicBool>,
}

impl std::fmt::Debug for Pipe {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Pipe")
            .field("host", &self.host)
            .field("port", &self.port)
            .finish_non_exhaustive()
    }
}

struct Conn {
    /// Requests queued or in flight.
    load: AtomicUsize,
    /// Requests queued and not yet taken by the writer: a new request that
    /// joins them goes out in the same `writev`.
    unwritten: AtomicUsize,
    closed: AtomicBool,
    /// Signalled (with a permit) by [`Pipe::abandon`]: the connection task
    /// fails everything on it and ends.
    abort: tokio::sync::Notify,
    /// Milliseconds since the pipe's epoch of the last answer, or of the
    /// moment the connection went from idle to busy.
    progress: AtomicU64,
    /// The pipe's [`Pipe::one_answer_per_conn`].
    one_answer_per_conn: Arc<AtomicBool>,
}

impl Pipe {
    /// `host` without brackets for IPv6.
    pub fn new(host: &str, port: u16, connect_timeout: Duration) -> Pipe {
        Pipe {
            host: host
                .trim_start_matches('[')
                .trim_end_matches(']')
                .to_owned(),
            port,
            connect_timeout,
            epoch: Instant::now(),
            conns: Mutex::new(Vec::new()),
            one_answer_per_conn: Arc::new(AtomicBool::new(false)),
            abandoned: AtomicBool::new(false),
        }
    }

    /// Gives up every request waiting on this pipe and any sent later: each
    /// gets `PipeErrorKind::Abandoned` at once. Shutdown uses it when its
    /// bound has passed, so the callers spool their copies.
    pub fn abandon(&self) {
        let conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        self.abandoned.store(true, Ordering::Release);
        for (c, _) in conns.iter() {
            c.abort.notify_one();
        }
    }

    fn now_ms(&self) -> u64 {
        ms_since(self.epoch, Instant::now())
    }

    /// Sends one request (head and body already encoded) and waits for its
    /// answer until `deadline`.
    ///
    /// There is no timer here: the connection answers every request by its
    /// deadline (the connect is bounded by `connect_timeout`; once written,
    /// the reader arms the oldest pending request's deadline; a request
    /// whose deadline has passed when its turn to be written comes, or when
    /// its connection closes, gets `Timeout`). A timer per copy cost about
    /// 5 % of the request path's instructions (docs/performance.md).
    ///
    /// `now` is the caller's recent clock reading (it has one: the clock is
    /// read once per request, not once per step).
    pub async fn send(
        &self,
        head: Bytes,
        body: Bytes,
        now: Instant,
        deadline: Instant,
    ) -> Result<RawAnswer, PipeError> {
        let (reply, rx) = oneshot::channel();
        self.submit(
            Job {
                head,
                body,
                deadline,
                reply,
            },
            now,
        );
        match rx.await {
            Err(_) => Err(PipeError::new(
                PipeErrorKind::NotSent,
                "connection task ended",
            )),
            Ok(result) => result,
        }
    }

    fn submit(&self, job: Job, now: Instant) {
        let now = ms_since(self.epoch, now);
        let mut conns = self.conns.lock().unwrap_or_else(|p| p.into_inner());
        if self.abandoned.load(Ordering::Acquire) {
            drop(conns);
            let _ = job.reply.send(Err(abandoned()));
            return;
        }
        conns.retain(|(c, _)| !c.closed.load(Ordering::Acquire));
        let one_each = self.one_answer_per_conn.load(Ordering::Acquire);
        let i = match choose(&conns, now, one_each) {
            Some(i) => i,
            None => {
                conns.push(self.open());
                conns.len() - 1
            }
        };
        // Sent under the lock (a send on an unbounded channel does not
        // wait): no clone of the connection and its sender per request.
        let Some((conn, tx)) = conns.get(i) else {
            return;
        };
        if conn.load.fetch_add(1, Ordering::AcqRel) == 0 {
            conn.progress.store(now, Ordering::Release);
        }
        conn.unwritten.fetch_add(1, Ordering::AcqRel);
        if let Err(mpsc::error::SendError(job)) = tx.send(job) {
            conn.unwritten.fetch_sub(1, Ordering::AcqRel);
            conn.load.fetch_sub(1, Ordering::AcqRel);
            let _ = job.reply.send(Err(PipeError::new(
                PipeErrorKind::NotSent,
                "connection closed",
            )));
        }
    }

    fn open(&self) -> (Arc<Conn>, mpsc::UnboundedSender<Job>) {
        let (tx, rx) = mpsc::unbounded_channel();
        let conn = Arc::new(Conn {
            load: AtomicUsize::new(0),
            unwritten: AtomicUsize::new(0),
            closed: AtomicBool::new(false),
            abort: tokio::sync::Notify::new(),
            progress: AtomicU64::new(self.now_ms()),
            one_answer_per_conn: self.one_answer_per_conn.clone(),
        });
        tokio::spawn(run(
            self.host.clone(),
            self.port,
            self.connect_timeout,
            self.epoch,
            conn.clone(),
            rx,
        ));
        (conn, tx)
    }
}

/// The index of the connection for a new request; `None`: open a new one.
fn choose(
    conns: &[(Arc<Conn>, mpsc::UnboundedSender<Job>)],
    now: u64,
    one_answer_per_conn: bool,
) -> Option<usize> {
    let load = |i: usize| conns[i].0.load.load(Ordering::Acquire);
    if one_answer_per_conn {
        // One request per connection, as hyper's client would send them;
        // pipelined only past the bound on connections.
        if conns.len() < MAX_CONNS {
            return (0..conns.len()).find(|&i| load(i) == 0);
        }
        return (0..conns.len()).min_by_key(|&i| load(i));
    }
    // Join a batch that is about to be written (nothing waits ahead of it
    // but that write), then an idle connection.
    if let Some(joining) = (0..conns.len()).find(|&i| {
        let u = conns[i].0.unwritten.load(Ordering::Acquire);
        u > 0 && u < MAX_BATCH && load(i) == u
    }) {
        return Some(joining);
    }
    if let Some(idle) = (0..conns.len()).find(|&i| load(i) == 0) {
        return Some(idle);
    }
    if conns.len() < PREFERRED_CONNS {
        return None;
    }
    let stall = STALL.as_millis() as u64;
    let busy = (0..conns.len())
        .filter(|&i| {
            load(i) < MAX_DEPTH
                && now.saturating_sub(conns[i].0.progress.load(Ordering::Acquire)) < stall
        })
        .min_by_key(|&i| load(i));
    if busy.is_some() {
        return busy;
    }
    if conns.len() < MAX_CONNS {
        return None;
    }
    (0..conns.len()).min_by_key(|&i| load(i))
}

async fn connect(host: &str, port: u16) -> std::io::Result<TcpStream> {
    let mut last = None;
    for addr in tokio::net::lookup_host((host, port)).await? {
        let socket = if addr.is_ipv4() {
            TcpSocket::new_v4()?
        } else {
            TcpSocket::new_v6()?
        };
        socket.set_keepalive(true)?;
        socket.set_nodelay(true)?;
        match socket.connect(addr).await {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(last.unwrap_or_else(|| std::io::Error::other("no address")))
}

/// State shared by the writer and the reader of one connection (one task).
struct Shared {
    conn: Arc<Conn>,
    epoch: Instant,
    pending: Mutex<VecDeque<Pending>>,
    /// Requests wholly written since the connection opened, and requests
    /// answered since then: the oldest
    /// pending request is wholly written when `written > answered`, which
    /// holds for early answers too (a target may answer a request before
    /// it has all of it). Touched by the connection's one task only.
    written: AtomicUsize,
    answered: AtomicUsize,
    /// Signalled by the writer when it adds pending requests, so that the
    /// reader, which may be waiting for bytes with no deadline armed, arms
    /// the oldest request's deadline.
    pending_added: tokio::sync::Notify,
}

impl Shared {
    fn lock(&self) -> std::sync::MutexGuard<'_, VecDeque<Pending>> {
        self.pending.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// One request less on the connection, at `now_ms` (a reading the
    /// caller made for its whole batch).
    fn done_one(&self, now_ms: u64) {
        self.conn.load.fetch_sub(1, Ordering::AcqRel);
        self.conn.progress.store(now_ms, Ordering::Release);
    }

    fn ms(&self, at: Instant) -> u64 {
        ms_since(self.epoch, at)
    }

    /// The kind for the oldest pending request when the connection ends
    /// without its answer: `Io` if it was wholly written (the target may
    /// have acted on it), else `NotSent`.
    fn unanswered(&self) -> PipeErrorKind {
        if self.written.load(Ordering::Relaxed) > self.answered.load(Ordering::Relaxed) {
            PipeErrorKind::Io
        } else {
            PipeErrorKind::NotSent
        }
    }

    fn complete(&self, result: Result<RawAnswer, PipeError>, now_ms: u64) {
        let front = self.lock().pop_front();
        if let Some(p) = front {
            self.answered.fetch_add(1, Ordering::Relaxed);
            self.done_one(now_ms);
            let _ = p.reply.send(result);
        }
    }
}

/// How a connection ended, for the requests still on it.
struct End {
    /// The error for the oldest pending request.
    first: PipeError,
}

async fn run(
    host: String,
    port: u16,
    connect_timeout: Duration,
    epoch: Instant,
    conn: Arc<Conn>,
    mut rx: mpsc::UnboundedReceiver<Job>,
) {
    // However the task ends (a panic, the runtime shutting down), the
    // connection leaves the pool.
    let _leaves_the_pool = ClosedOnDrop(conn.clone());
    let shared = Shared {
        conn,
        epoch,
        pending: Mutex::new(VecDeque::new()),
        written: AtomicUsize::new(0),
        answered: AtomicUsize::new(0),
        pending_added: tokio::sync::Notify::new(),
    };
    let connected = tokio::select! {
        c = tokio::time::timeout(connect_timeout, connect(&host, port)) => Some(c),
        () = shared.conn.abort.notified() => None,
    };
    let Some(connected) = connected else {
        close(&shared, &mut rx, abandoned());
        return;
    };
    let stream = match connected {
        Ok(Ok(s)) => Some(s),
        Ok(Err(e)) => {
            close(
                &shared,
                &mut rx,
                PipeError::new(
                    PipeErrorKind::Connect,
                    format!("connect {host}:{port}: {e}"),
                ),
            );
            None
        }
        Err(_) => {
            close(
                &shared,
                &mut rx,
                PipeError::new(
                    PipeErrorKind::Connect,
                    format!("connect {host}:{port}: timed out"),
                ),
            );
            None
        }
    };
    let Some(stream) = stream else { return };
    let (rd, wr) = stream.into_split();
    let end = {
        let reader = read_loop(rd, &shared);
        let writer = write_loop(wr, &mut rx, &shared);
        // Registered once for the connection's life, not per request.
        let abort = shared.conn.abort.notified();
        tokio::pin!(reader, writer, abort);
        let mut writing = true;
        loop {
            tokio::select! {
                end = &mut reader => break end,
                () = &mut abort => break End { first: abandoned() },
                w = &mut writer, if writing => match w {
                    // The target may have answered before it stopped
                    // reading (a 413 for a body it will not take, then a
                    // close): the connection takes no new request (see
                    // `failed_write`), and the reader reads what was sent
                    // before the connection ends. Its end says whether
                    // the oldest request went out whole.
                    Err(e) => {
                        writing = false;
                        if shared.lock().is_empty() {
                            break End { first: e };
                        }
                    }
                    // The pipe is gone: finish what is in flight, then close.
                    Ok(()) => {
                        writing = false;
                        if shared.lock().is_empty() {
                            break End { first: PipeError::new(PipeErrorKind::NotSent, "closed") };
                        }
                    }
                },
            }
        }
    };
    close(&shared, &mut rx, end.first);
}

/// Marks a connection closed when dropped.
struct ClosedOnDrop(Arc<Conn>);

impl Drop for ClosedOnDrop {
    fn drop(&mut self) {
        self.0.closed.store(true, Ordering::Release);
    }
}

/// Marks the connection closed and fails everything on it: the oldest
/// pending request with `first`, the other pending ones and those never
/// written as not sent (or, when the connection never opened, with the
/// connect error).
fn close(shared: &Shared, rx: &mut mpsc::UnboundedReceiver<Job>, first: PipeError) {
    shared.conn.closed.store(true, Ordering::Release);
    rx.close();
    let pending: Vec<Pending> = shared.lock().drain(..).collect();
    let now = Instant::now();
    let now_ms = shared.ms(now);
    let mut first = Some(first);
    for p in pending {
        shared.done_one(now_ms);
        let err = match first.take() {
            Some(e) => e,
            None if p.deadline <= now => late(),
            None => PipeError::new(PipeErrorKind::NotSent, "connection closed"),
        };
        let _ = p.reply.send(Err(err));
    }
    fail_queued(shared, rx, now, |job| match &first {
        Some(e) if e.kind == PipeErrorKind::Connect => {
            PipeError::new(PipeErrorKind::Connect, e.detail.as_str())
        }
        _ if job.deadline <= now => late(),
        Some(e) => PipeError::new(PipeErrorKind::NotSent, e.detail.as_str()),
        None => PipeError::new(PipeErrorKind::NotSent, "connection closed"),
    });
}

/// Closes the connection's queue and fails the requests in it (none of
/// them written), each with the error `err` gives it.
fn fail_queued(
    shared: &Shared,
    rx: &mut mpsc::UnboundedReceiver<Job>,
    now: Instant,
    err: impl Fn(&Job) -> PipeError,
) {
    rx.close();
    let now_ms = shared.ms(now);
    while let Ok(job) = rx.try_recv() {
        shared.conn.unwritten.fetch_sub(1, Ordering::AcqRel);
        shared.done_one(now_ms);
        let e = err(&job);
        let _ = job.reply.send(Err(e));
    }
}

/// Milliseconds from `epoch` to `at` (0 before it).
fn ms_since(epoch: Instant, at: Instant) -> u64 {
    u64::try_from(at.saturating_duration_since(epoch).as_millis()).unwrap_or(u64::MAX)
}

/// The error of a request given up by [`Pipe::abandon`].
fn abandoned() -> PipeError {
    PipeError::new(PipeErrorKind::Abandoned, "abandoned at shutdown")
}

/// The error of a request whose deadline passed before its answer came.
fn late() -> PipeError {
    PipeError::new(PipeErrorKind::Timeout, "no answer in time")
}

async fn write_loop(
    mut wr: OwnedWriteHalf,
    rx: &mut mpsc::UnboundedReceiver<Job>,
    shared: &Shared,
) -> Result<(), PipeError> {
    let mut batch: Vec<Job> = Vec::with_capacity(MAX_BATCH);
    // The pieces to write, each marked when it ends a request.
    let mut out: VecDeque<(Bytes, bool)> = VecDeque::with_capacity(2 * MAX_BATCH);
    loop {
        if rx.recv_many(&mut batch, MAX_BATCH).await == 0 {
            return Ok(());
        }
        if batch.len() < MAX_BATCH {
            // Let the tasks that are ready run first: the requests they are
            // about to submit go out with this write instead of one write
            // each (without this, tokio runs this task right after the
            // first submitter, and batches stay at one or two requests).
            behind_the_ready_tasks().await;
            while batch.len() < MAX_BATCH {
                match rx.try_recv() {
                    Ok(job) => batch.push(job),
                    Err(_) => break,
                }
            }
        }
        shared
            .conn
            .unwritten
            .fetch_sub(batch.len(), Ordering::AcqRel);
        let mut queued = false;
        {
            let now = Instant::now();
            let mut pending = shared.lock();
            for job in batch.drain(..) {
                if job.reply.is_closed() || job.deadline <= now {
                    // The caller has gone (it spooled the copy), or its
                    // deadline passed while the request waited: do not send.
                    shared.done_one(shared.ms(now));
                    let _ = job.reply.send(Err(late()));
                    continue;
                }
                if job.body.is_empty() {
                    out.push_back((job.head, true));
                } else {
                    out.push_back((job.head, false));
                    out.push_back((job.body, true));
                }
                pending.push_back(Pending {
                    deadline: job.deadline,
                    reply: job.reply,
                });
                queued = true;
            }
        }
        if queued {
            shared.pending_added.notify_one();
        }
        while !out.is_empty() {
            let n = {
                // No allocation (the array lives in the connection's task):
                // a whole batch's heads and bodies fit one `writev` (Linux
                // takes up to 1,024 pieces).
                let mut slices = [IoSlice::new(&[]); 2 * MAX_BATCH];
                let mut len = 0;
                for (slice, (b, _)) in slices.iter_mut().zip(&out) {
                    *slice = IoSlice::new(b);
                    len += 1;
                }
                wr.write_vectored(&slices[..len]).await
            };
            match n {
                Ok(0) => {
                    let e = PipeError::new(shared.unanswered(), "connection closed while sending");
                    return Err(failed_write(shared, rx, e));
                }
                Ok(mut n) => {
                    let mut ended = 0;
                    while n > 0 {
                        let Some((front, ends_request)) = out.front_mut() else {
                            break;
                        };
                        if front.len() <= n {
                            n -= front.len();
                            ended += usize::from(*ends_request);
                            out.pop_front();
                        } else {
                            front.advance(n);
                            n = 0;
                        }
                    }
                    // Counted as each request is wholly written, not per
                    // batch: a connection that fails in the middle of a
                    // batch knows which of its requests went out.
                    shared.written.fetch_add(ended, Ordering::Relaxed);
                }
                Err(e) => {
                    let e = PipeError::new(shared.unanswered(), format!("sending: {e}"));
                    return Err(failed_write(shared, rx, e));
                }
            }
        }
    }
}

/// A write failed: the requests queued behind it will not be written on
/// this connection, and are failed as not sent at once (sent again on
/// another), while the reader reads what the target sent before it
/// stopped reading (see `run`).
fn failed_write(shared: &Shared, rx: &mut mpsc::UnboundedReceiver<Job>, e: PipeError) -> PipeError {
    shared.conn.closed.store(true, Ordering::Release);
    let now = Instant::now();
    fail_queued(shared, rx, now, |job| {
        if job.deadline <= now {
            late()
        } else {
            PipeError::new(PipeErrorKind::NotSent, e.detail.as_str())
        }
    });
    e
}

/// Lets the tasks already queued run once before the caller goes on,
/// without waiting for the I/O driver's next turn as
/// `tokio::task::yield_now` does: the task wakes itself, and tokio puts a
/// task woken while it runs at the back of its worker's queue. With
/// `yield_now`, every batch cost the worker one more `epoll_wait`. (On a
/// runtime with several workers the requeue may unpark an idle one, as
/// any task woken behind another does; a worker that steals the
/// submitters runs them in parallel, and their requests go in the next
/// batch.)
fn behind_the_ready_tasks() -> impl Future<Output = ()> {
    let mut yielded = false;
    std::future::poll_fn(move |cx| {
        if yielded {
            return std::task::Poll::Ready(());
        }
        yielded = true;
        cx.waker().wake_by_ref();
        std::task::Poll::Pending
    })
}

/// How the body of the answer being read is delimited.
enum Framing {
    Length(usize),
    Chunked,
    UntilEof,
}

impl Framing {
    /// Most bytes of the body held while it is read: the body itself, or
    /// for a chunked body also its framing, extensions and trailers, which
    /// its decoded length does not count.
    fn buffer_limit(&self) -> usize {
        match self {
            Framing::Chunked => MAX_CHUNKED_BUFFER,
            Framing::Length(_) | Framing::UntilEof => MAX_ANSWER_BODY,
        }
    }
}

/// An answer whose head is parsed and whose body is being read.
struct Partial {
    status: StatusCode,
    head: Bytes,
    framing: Framing,
    close_after: bool,
    /// How far a chunked body is checked, so each read goes on from there.
    chunks: ChunkScan,
}

async fn read_loop(mut rd: OwnedReadHalf, shared: &Shared) -> End {
    let mut buf = BytesMut::with_capacity(16 << 10);
    let mut partial: Option<Partial> = None;
    // Bytes still to skip of an answer body over the limit.
    let mut discard: usize = 0;
    // Answers completed on this connection.
    let mut answers: u64 = 0;
    let sleep = tokio::time::sleep(Duration::from_secs(3600));
    tokio::pin!(sleep);
    let mut armed: Option<Instant> = None;
    loop {
        // One clock reading for the answers of one read.
        let now_ms = shared.ms(Instant::now());
        // Every complete answer in the buffer.
        loop {
            if discard > 0 {
                let n = discard.min(buf.len());
                buf.advance(n);
                discard -= n;
                if discard > 0 {
                    break;
                }
            }
            if partial.is_none() {
                if buf.is_empty() {
                    break;
                }
                if shared.lock().is_empty() {
                    return End {
                        first: PipeError::new(
                            PipeErrorKind::Io,
                            "bytes from the target with no request",
                        ),
                    };
                }
                match parse_head(&mut buf) {
                    Ok(Some(p)) => partial = p,
                    Ok(None) => {
                        if buf.len() > MAX_HEAD {
                            return End {
                                first: PipeError::new(PipeErrorKind::Io, "answer head too large"),
                            };
                        }
                        break;
                    }
                    Err(e) => return End { first: e },
                }
                continue;
            }
            let Some(p) = partial.as_mut() else { break };
            let body = match p.framing {
                Framing::Length(n) if n > MAX_ANSWER_BODY => {
                    discard = n;
                    Some(None)
                }
                Framing::Length(n) if buf.len() >= n => Some(Some(buf.split_to(n).freeze())),
                Framing::Length(_) => None,
                // Held whole until the target closes, or until the last
                // chunk: bounded while it is read.
                Framing::UntilEof | Framing::Chunked if buf.len() > p.framing.buffer_limit() => {
                    let Some(p) = partial.take() else { break };
                    return oversized(shared, p, now_ms);
                }
                Framing::UntilEof => None,
                Framing::Chunked => match decode_chunked(&buf, &mut p.chunks) {
                    Err(e) => return End { first: e },
                    Ok(ChunkState::Incomplete(decoded)) if decoded > MAX_ANSWER_BODY => {
                        let Some(p) = partial.take() else { break };
                        return oversized(shared, p, now_ms);
                    }
                    Ok(ChunkState::Incomplete(_)) => None,
                    Ok(ChunkState::Done { body, consumed }) => {
                        buf.advance(consumed);
                        Some(body)
                    }
                },
            };
            let Some(body) = body else { break };
            let Some(p) = partial.take() else { break };
            shared.complete(
                Ok(RawAnswer {
                    status: p.status,
                    head: p.head,
                    body,
                }),
                now_ms,
            );
            answers += 1;
            // Learnt from every connection's first answer that closes it,
            // and unlearnt from any second answer: a target that closes now
            // and then (after so many requests, say) is still pipelined to.
            let one_each = &shared.conn.one_answer_per_conn;
            if answers == 1 && p.close_after {
                one_each.store(true, Ordering::Release);
            } else if answers == 2 {
                one_each.store(false, Ordering::Release);
            }
            if p.close_after {
                return End {
                    first: PipeError::new(
                        PipeErrorKind::NotSent,
                        "the target closed the connection",
                    ),
                };
            }
        }
        let front = shared.lock().front().map(|p| p.deadline);
        if front != armed {
            if let Some(d) = front {
                sleep.as_mut().reset(d.into());
            }
            armed = front;
        }
        if buf.capacity() - buf.len() < 4096 {
            buf.reserve(16 << 10);
        }
        tokio::select! {
            r = rd.read_buf(&mut buf) => match r {
                Ok(0) => {
                    if matches!(partial.as_ref().map(|p| &p.framing), Some(Framing::UntilEof))
                        && let Some(p) = partial.take()
                    {
                        let body = buf.split().freeze();
                        shared.complete(Ok(RawAnswer {
                            status: p.status,
                            head: p.head,
                            body: (body.len() <= MAX_ANSWER_BODY).then_some(body),
                        }), now_ms);
                        return End { first: PipeError::new(PipeErrorKind::NotSent, "closed") };
                    }
                    // Cut mid-answer, or after the request was written (like
                    // hyper's client: the target may have acted on it): Io.
                    // Not written yet (the target closed an idle connection
                    // as the request went out): send it again.
                    let mid_answer = partial.is_some() || discard > 0 || !buf.is_empty();
                    let kind = if mid_answer { PipeErrorKind::Io } else { shared.unanswered() };
                    return End {
                        first: PipeError::new(kind, "the target closed the connection before answering"),
                    };
                }
                Ok(_) => {}
                Err(e) => {
                    // A reset: as for a close, the oldest request was acted
                    // on only if it was wholly written or is being answered.
                    let mid_answer = partial.is_some() || discard > 0 || !buf.is_empty();
                    let kind = if mid_answer { PipeErrorKind::Io } else { shared.unanswered() };
                    return End { first: PipeError::new(kind, format!("reading the answer: {e}")) };
                }
            },
            () = &mut sleep, if armed.is_some() => return End { first: late() },
            // New requests: arm the oldest one's deadline if none was.
            () = shared.pending_added.notified(), if armed.is_none() => {}
        }
    }
}

/// Completes an answer whose body is over [`MAX_ANSWER_BODY`] (relayed as
/// 502) without reading the rest, and ends its connection.
fn oversized(shared: &Shared, p: Partial, now_ms: u64) -> End {
    shared.complete(
        Ok(RawAnswer {
            status: p.status,
            head: p.head,
            body: None,
        }),
        now_ms,
    );
    End {
        first: PipeError::new(PipeErrorKind::NotSent, "closed after an oversized answer"),
    }
}

/// Parses an answer head at the start of `buf` (consuming it). `Ok(None)`:
/// incomplete. `Ok(Some(None))`: an informational (1xx) answer was skipped.
fn parse_head(buf: &mut BytesMut) -> Result<Option<Option<Partial>>, PipeError> {
    // Uninitialised slots: zeroing 100 headers cost more than parsing a
    // typical answer's few.
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    let len = match httparse::ParserConfig::default().parse_response_with_uninit_headers(
        &mut resp,
        buf,
        &mut headers,
    ) {
        Ok(httparse::Status::Complete(n)) => n,
        Ok(httparse::Status::Partial) => return Ok(None),
        Err(e) => {
            return Err(PipeError::new(
                PipeErrorKind::Io,
                format!("invalid answer head: {e}"),
            ));
        }
    };
    let code = resp.code.unwrap_or(0);
    let status = StatusCode::from_u16(code)
        .map_err(|_| PipeError::new(PipeErrorKind::Io, format!("invalid status {code}")))?;
    let http10 = resp.version == Some(0);
    let mut length: Option<usize> = None;
    let mut chunked = false;
    let mut encoded = false;
    let mut close_after = http10;
    // Only the framing headers matter here (names compared as bytes: no
    // HeaderName is made for headers that are skipped).
    for h in resp.headers.iter() {
        let name = h.name.as_bytes();
        if name.eq_ignore_ascii_case(b"content-length") {
            let n = std::str::from_utf8(h.value)
                .ok()
                .and_then(|s| s.trim().parse::<usize>().ok())
                .ok_or_else(|| PipeError::new(PipeErrorKind::Io, "invalid Content-Length"))?;
            if length.is_some_and(|l| l != n) {
                return Err(PipeError::new(
                    PipeErrorKind::Io,
                    "conflicting Content-Length",
                ));
            }
            length = Some(n);
            continue;
        }
        if name.eq_ignore_ascii_case(b"transfer-encoding") {
            encoded = true;
            chunked = h
                .value
                .rsplit(|b| *b == b',')
                .next()
                .is_some_and(|last| last.trim_ascii().eq_ignore_ascii_case(b"chunked"));
        }
        if name.eq_ignore_ascii_case(b"connection") {
            for token in h.value.split(|b| *b == b',') {
                let token = token.trim_ascii();
                if token.eq_ignore_ascii_case(b"close") {
                    close_after = true;
                } else if token.eq_ignore_ascii_case(b"keep-alive") && http10 {
                    close_after = false;
                }
            }
        }
    }
    if status.is_informational() {
        buf.advance(len);
        return Ok(Some(None));
    }
    // Kept as received (no copy); a header map is made from it only if the
    // answer is relayed (in active-active, one answer of two is not).
    let head = buf.split_to(len).freeze();
    let framing = if status == StatusCode::NO_CONTENT || status == StatusCode::NOT_MODIFIED {
        Framing::Length(0)
    } else if chunked {
        Framing::Chunked
    } else if let (Some(n), false) = (length, encoded) {
        Framing::Length(n)
    } else {
        close_after = true;
        Framing::UntilEof
    };
    Ok(Some(Some(Partial {
        status,
        head,
        framing,
        close_after,
        chunks: ChunkScan::default(),
    })))
}

/// The end-to-end headers of an answer head that [`parse_head`] accepted:
/// every header but Content-Length, the hop-by-hop ones and those named in
/// `Connection`. Values are slices of `head` (no copy).
pub fn head_headers(head: &Bytes) -> HeaderMap {
    let mut headers = [const { MaybeUninit::uninit() }; MAX_HEADERS];
    let mut resp = httparse::Response::new(&mut []);
    if !matches!(
        httparse::ParserConfig::default().parse_response_with_uninit_headers(
            &mut resp,
            head,
            &mut headers
        ),
        Ok(httparse::Status::Complete(_))
    ) {
        return HeaderMap::new();
    }
    let mut named = Vec::new();
    for h in resp.headers.iter() {
        if h.name.eq_ignore_ascii_case("connection") {
            named.extend(
                h.value
                    .split(|b| *b == b',')
                    .filter_map(|t| HeaderName::from_bytes(t.trim_ascii()).ok()),
            );
        }
    }
    let mut map = HeaderMap::with_capacity(resp.headers.len());
    for h in resp.headers.iter() {
        // Every answer has one; skipped before its name is parsed.
        if h.name.eq_ignore_ascii_case("content-length") {
            continue;
        }
        let Ok(name) = HeaderName::from_bytes(h.name.as_bytes()) else {
            continue;
        };
        if crate::proxy_headers::is_hop_by_hop(&name) || named.contains(&name) {
            continue;
        }
        if let Ok(value) = HeaderValue::from_maybe_shared(head.slice_ref(h.value)) {
            map.append(name, value);
        }
    }
    map
}

enum ChunkState {
    /// Not all there yet; the data bytes received so far.
    Incomplete(usize),
    Done {
        /// `None` when the data is larger than [`MAX_ANSWER_BODY`].
        body: Option<Bytes>,
        /// The body's length on the wire, trailers included.
        consumed: usize,
    },
}

/// Where the decoding of a chunked body being received stopped: the start
/// of the first chunk not wholly received, and the data before it. Each
/// read goes on from there, so each chunk of a large answer in many reads
/// is checked and copied once. (A size line or trailers still being
/// received are checked from their start at each read: bounded by
/// `MAX_CHUNKED_BUFFER`.)
#[derive(Debug, Default)]
struct ChunkScan {
    pos: usize,
    /// Data bytes before `pos`.
    decoded: usize,
    /// That data, while it is within [`MAX_ANSWER_BODY`].
    data: BytesMut,
}

/// The chunk whose size line starts at a position of a chunked body.
enum Chunk {
    /// Not wholly received; the data bytes of it that are.
    Partial(usize),
    Data {
        data: std::ops::Range<usize>,
        /// Where the next chunk starts.
        next: usize,
    },
    /// The last chunk and the trailers: the body ends at `end`.
    Last { end: usize },
}

fn chunk_at(buf: &[u8], mut pos: usize) -> Result<Chunk, PipeError> {
    let size = match httparse::parse_chunk_size(&buf[pos..]) {
        Ok(httparse::Status::Complete((n, size))) => {
            pos += n;
            usize::try_from(size)
                .map_err(|_| PipeError::new(PipeErrorKind::Io, "chunk too large"))?
        }
        Ok(httparse::Status::Partial) => return Ok(Chunk::Partial(0)),
        Err(_) => return Err(PipeError::new(PipeErrorKind::Io, "invalid chunk size")),
    };
    if size == 0 {
        // Trailers, then an empty line.
        loop {
            let rest = &buf[pos..];
            let Some(eol) = rest.windows(2).position(|w| w == b"\r\n") else {
                return Ok(Chunk::Partial(0));
            };
            pos += eol + 2;
            if eol == 0 {
                return Ok(Chunk::Last { end: pos });
            }
        }
    }
    // The size is the target's: added without overflow.
    let have = buf.len() - pos;
    if have < size.saturating_add(2) {
        return Ok(Chunk::Partial(have.min(size)));
    }
    let data = pos..pos + size;
    if &buf[data.end..data.end + 2] != b"\r\n" {
        return Err(PipeError::new(PipeErrorKind::Io, "invalid chunk end"));
    }
    Ok(Chunk::Data {
        next: data.end + 2,
        data,
    })
}

/// Decodes a chunked body at the start of `buf` (trailers skipped), going
/// on from `scan`, where the previous call with a shorter `buf` stopped.
fn decode_chunked(buf: &[u8], scan: &mut ChunkScan) -> Result<ChunkState, PipeError> {
    loop {
        match chunk_at(buf, scan.pos)? {
            Chunk::Partial(have) => return Ok(ChunkState::Incomplete(scan.decoded + have)),
            Chunk::Data { data, next } => {
                scan.decoded += data.len();
                if scan.decoded <= MAX_ANSWER_BODY {
                    scan.data.extend_from_slice(&buf[data]);
                }
                scan.pos = next;
            }
            Chunk::Last { end } => {
                let body = (scan.decoded <= MAX_ANSWER_BODY)
                    .then(|| std::mem::take(&mut scan.data).freeze());
                return Ok(ChunkState::Done {
                    body,
                    consumed: end,
                });
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn chunked_bodies_are_decoded_and_trailers_skipped() -> TestResult {
        let raw = b"5\r\nhello\r\n6\r\n world\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        let ChunkState::Done {
            body: Some(body),
            consumed,
        } = decode_chunked(raw, &mut ChunkScan::default())?
        else {
            return Err("a complete chunked body was reported incomplete".into());
        };
        assert_eq!(&body[..], b"hello world");
        assert_eq!(&raw[consumed..], b"NEXT");
        assert!(matches!(
            decode_chunked(b"5\r\nhel", &mut ChunkScan::default())?,
            ChunkState::Incomplete(3)
        ));
        Ok(())
    }

    /// The body as it arrives, a byte at a time: the same answer as all at
    /// once, and each call goes on from the last whole chunk (a large
    /// answer in many reads is not checked from its start at every read).
    #[test]
    fn a_chunked_body_received_a_byte_at_a_time_decodes_as_it_does_whole() -> TestResult {
        let raw = b"5\r\nhello\r\n6;ext=1\r\n world\r\n0\r\nx-t: 1\r\n\r\nNEXT";
        let end = raw.len() - b"NEXT".len();
        let mut scan = ChunkScan::default();
        for n in 0..end {
            match decode_chunked(&raw[..n], &mut scan)? {
                ChunkState::Incomplete(have) => assert!(have <= 11, "{n}: {have}"),
                ChunkState::Done { .. } => return Err(format!("done at {n} of {end}").into()),
            }
            if n >= 10 {
                assert!(scan.pos >= 10, "{n}: the first chunk is checked again");
            }
        }
        let ChunkState::Done {
            body: Some(body),
            consumed,
        } = decode_chunked(raw, &mut scan)?
        else {
            return Err("not done with the whole body".into());
        };
        assert_eq!((&body[..], consumed), (&b"hello world"[..], end));
        Ok(())
    }

    #[tokio::test]
    async fn a_target_that_closes_after_every_answer_gets_one_request_per_connection() -> TestResult
    {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        // Like a server with keep-alive off: one answer, then FIN (what was
        // pipelined behind the first request is read and ignored).
        tokio::spawn(async move {
            while let Ok((mut s, _)) = listener.accept().await {
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 << 10];
                    if s.read(&mut buf).await.is_ok_and(|n| n > 0) {
                        let _ = s
                            .write_all(
                                b"HTTP/1.1 200 OK\r\ncontent-length: 2\r\nconnection: close\r\n\r\nok",
                            )
                            .await;
                        let _ = s.shutdown().await;
                        while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
                    }
                });
            }
        });
        let pipe = Arc::new(Pipe::new("127.0.0.1", port, Duration::from_secs(5)));
        let sends = (0..32).map(|_| {
            let pipe = pipe.clone();
            tokio::spawn(async move {
                let head =
                    Bytes::from_static(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n");
                let deadline = Instant::now() + Duration::from_secs(20);
                // As `send_pipelined` does: a request not sent is sent
                // again, at most twice.
                let mut tries = 0;
                loop {
                    let r = pipe
                        .send(head.clone(), Bytes::new(), Instant::now(), deadline)
                        .await;
                    match r {
                        Err(e)
                            if e.kind == PipeErrorKind::NotSent
                                && tries < super::super::NOT_SENT_RETRIES =>
                        {
                            tries += 1
                        }
                        r => return r.map(|a| a.status),
                    }
                }
            })
        });
        for send in sends.collect::<Vec<_>>() {
            assert_eq!(send.await?.map_err(|e| e.detail)?, StatusCode::OK);
        }
        Ok(())
    }

    /// A target that answers a request before reading all of it (as a
    /// server refusing a body does), then one more, then resets the
    /// connection in the middle of a third request's body: the third was
    /// not wholly written, so it is reported not sent (the caller sends it
    /// again) rather than sent and lost (the target marked down).
    #[tokio::test]
    async fn a_request_cut_off_while_being_written_is_not_sent_even_after_an_early_answer()
    -> TestResult {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Larger than loopback's socket buffers on both ends.
        const BIG: usize = 32 << 20;
        let head = |n: u32, len: usize| {
            Bytes::from(format!(
                "POST /{n} HTTP/1.1\r\nhost: t\r\ncontent-length: {len}\r\n\r\n"
            ))
        };
        async fn read_until(
            s: &mut tokio::net::TcpStream,
            buf: &mut Vec<u8>,
            n: usize,
        ) -> std::io::Result<()> {
            while buf.len() < n {
                if s.read_buf(buf).await? == 0 {
                    return Err(std::io::Error::other("closed early"));
                }
            }
            Ok(())
        }
        let (head1, head2, head3) = (head(1, BIG), head(2, 0), head(3, BIG));
        let until = head1.len() + BIG + head2.len();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        let target = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await?;
            let mut buf = Vec::with_capacity(until + (64 << 10));
            const OK: &[u8] = b"HTTP/1.1 200 OK\r\ncontent-length: 0\r\n\r\n";
            read_until(&mut s, &mut buf, 1).await?;
            s.write_all(OK).await?; // before the body
            read_until(&mut s, &mut buf, until).await?;
            s.write_all(OK).await?;
            read_until(&mut s, &mut buf, until + 1).await?;
            // Unread bytes in hand: closing now resets the connection.
            drop(s);
            Ok::<_, std::io::Error>(())
        });
        let pipe = Pipe::new("127.0.0.1", port, Duration::from_secs(5));
        let big = Bytes::from(vec![b'x'; BIG]);
        let deadline = Instant::now() + Duration::from_secs(60);
        let first = pipe
            .send(head1, big.clone(), Instant::now(), deadline)
            .await;
        assert_eq!(first.map_err(|e| e.detail)?.status, StatusCode::OK);
        let second = pipe
            .send(head2, Bytes::new(), Instant::now(), deadline)
            .await;
        assert_eq!(second.map_err(|e| e.detail)?.status, StatusCode::OK);
        let third = pipe.send(head3, big, Instant::now(), deadline).await;
        target.await??;
        let kind = third.err().map(|e| e.kind);
        assert_eq!(kind, Some(PipeErrorKind::NotSent));
        Ok(())
    }

    /// A target that refuses a body it will not read (a 413 as soon as it
    /// has the head, then a close with the body unread, which resets the
    /// connection under forkd's write): its answer is relayed, not lost
    /// behind the failed write, so the copy is rejected, not retried for
    /// ever. (Eight times: which of the failed write and the answer forkd
    /// sees first is a race, which the old code lost about half the time.)
    #[tokio::test]
    async fn an_answer_sent_before_the_target_stopped_reading_is_not_lost_to_the_failed_write()
    -> TestResult {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        // Larger than loopback's socket buffers on both ends.
        const BIG: usize = 32 << 20;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        const ROUNDS: usize = 8;
        let target = tokio::spawn(async move {
            for _ in 0..ROUNDS {
                let (mut s, _) = listener.accept().await?;
                let mut buf = vec![0u8; 64 << 10];
                let mut head = Vec::new();
                while !head.windows(4).any(|w| w == b"\r\n\r\n") {
                    let n = s.read(&mut buf).await?;
                    if n == 0 {
                        return Err(std::io::Error::other("closed before the head"));
                    }
                    head.extend_from_slice(&buf[..n]);
                }
                s.write_all(
                    b"HTTP/1.1 413 Payload Too Large\r\ncontent-length: 0\r\nconnection: close\r\n\r\n",
                )
                .await?;
                // Unread body bytes in hand: this close resets the connection.
                drop(s);
            }
            Ok::<_, std::io::Error>(())
        });
        let pipe = Pipe::new("127.0.0.1", port, Duration::from_secs(5));
        let head = Bytes::from(format!(
            "POST / HTTP/1.1\r\nhost: t\r\ncontent-length: {BIG}\r\n\r\n"
        ));
        let body = Bytes::from(vec![b'x'; BIG]);
        let deadline = Instant::now() + Duration::from_secs(60);
        for round in 0..ROUNDS {
            let answer = pipe
                .send(head.clone(), body.clone(), Instant::now(), deadline)
                .await;
            assert_eq!(
                answer
                    .map(|a| a.status)
                    .map_err(|e| format!("round {round}: {:?}: {}", e.kind, e.detail)),
                Ok(StatusCode::PAYLOAD_TOO_LARGE)
            );
        }
        target.await??;
        Ok(())
    }

    #[test]
    fn a_chunk_size_near_the_largest_number_is_incomplete_not_a_panic() -> TestResult {
        assert!(matches!(
            decode_chunked(b"ffffffffffffffff\r\nxx", &mut ChunkScan::default())?,
            ChunkState::Incomplete(2)
        ));
        Ok(())
    }

    /// A target that answers with the head `head`, streams 8 MiB of `x`
    /// and never closes; `send`'s result.
    async fn answer_streamed_without_end(head: &'static [u8]) -> Result<RawAnswer, PipeError> {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let Ok(listener) = tokio::net::TcpListener::bind("127.0.0.1:0").await else {
            return Err(PipeError::new(PipeErrorKind::Connect, "bind"));
        };
        let port = listener.local_addr().map_or(0, |a| a.port());
        tokio::spawn(async move {
            let Ok((mut s, _)) = listener.accept().await else {
                return;
            };
            let mut buf = vec![0u8; 64 << 10];
            let _ = s.read(&mut buf).await;
            if s.write_all(head).await.is_err() {
                return;
            }
            let chunk = vec![b'x'; 64 << 10];
            // 8 MiB, past every limit under test, then the connection is
            // held open: an answer read to its end would never finish.
            for _ in 0..128 {
                if s.write_all(&chunk).await.is_err() {
                    return;
                }
            }
            std::future::pending::<()>().await;
        });
        let pipe = Pipe::new("127.0.0.1", port, Duration::from_secs(5));
        let head = Bytes::from_static(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 0\r\n\r\n");
        let deadline = Instant::now() + Duration::from_secs(60);
        pipe.send(head, Bytes::new(), Instant::now(), deadline)
            .await
    }

    #[tokio::test]
    async fn an_answer_without_length_over_the_limit_is_given_up_without_holding_it_whole()
    -> TestResult {
        let answer = answer_streamed_without_end(b"HTTP/1.0 200 OK\r\n\r\n").await?;
        assert_eq!(answer.status, StatusCode::OK);
        assert!(
            answer.body.is_none(),
            "an answer over the limit came with a body"
        );
        Ok(())
    }

    #[tokio::test]
    async fn a_chunked_answer_that_never_ends_its_chunk_extension_is_bounded() -> TestResult {
        let answer =
            answer_streamed_without_end(b"HTTP/1.1 200 OK\r\ntransfer-encoding: chunked\r\n\r\n1;")
                .await?;
        assert!(answer.body.is_none(), "an endless answer came with a body");
        Ok(())
    }

    #[tokio::test]
    async fn a_connection_whose_target_never_answers_is_closed_at_the_deadline_and_lets_go_of_the_bodies()
    -> TestResult {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        // The target reads everything and never answers; it reports when
        // forkd closes the connection.
        let (closed_tx, closed_rx) = oneshot::channel();
        tokio::spawn(async move {
            if let Ok((mut s, _)) = listener.accept().await {
                let mut buf = vec![0u8; 64 << 10];
                while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
            }
            let _ = closed_tx.send(());
        });
        let pipe = Pipe::new("127.0.0.1", port, Duration::from_secs(5));
        let head =
            Bytes::from_static(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 4096\r\n\r\n");
        let body = Bytes::from(vec![b'x'; 4096]);
        let deadline = Instant::now() + Duration::from_millis(200);
        let answer = pipe
            .send(head, body.clone(), Instant::now(), deadline)
            .await;
        assert_eq!(answer.err().map(|e| e.kind), Some(PipeErrorKind::Timeout));
        // Before the fix the connection stayed open for good, holding what
        // it had not written; bounded wait for the close.
        tokio::time::timeout(Duration::from_secs(30), closed_rx)
            .await
            .map_err(|_| "the connection was not closed after its request's deadline")??;
        assert!(body.is_unique(), "the pipe still holds the request body");
        Ok(())
    }

    #[tokio::test]
    async fn requests_pipelined_behind_one_that_is_never_answered_are_all_answered_without_a_caller_timer()
    -> TestResult {
        use tokio::io::AsyncReadExt;
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await?;
        let port = listener.local_addr()?.port();
        tokio::spawn(async move {
            loop {
                let Ok((mut s, _)) = listener.accept().await else {
                    return;
                };
                tokio::spawn(async move {
                    let mut buf = vec![0u8; 64 << 10];
                    while s.read(&mut buf).await.is_ok_and(|n| n > 0) {}
                });
            }
        });
        let pipe = Pipe::new("127.0.0.1", port, Duration::from_secs(5));
        let head = Bytes::from_static(b"POST / HTTP/1.1\r\nhost: t\r\ncontent-length: 1\r\n\r\n");
        let start = Instant::now();
        // More requests than the connections opened before pipelining, so
        // most wait behind an unanswered one; no caller-side timer exists.
        let sends = (0..3 * PREFERRED_CONNS as u64).map(|i| {
            let deadline = start + Duration::from_millis(100 + 20 * i);
            pipe.send(head.clone(), Bytes::from_static(b"x"), start, deadline)
        });
        let results =
            tokio::time::timeout(Duration::from_secs(30), futures::future::join_all(sends))
                .await
                .map_err(|_| "a request was never answered")?;
        // Each one is answered: Timeout once its deadline passed, or NotSent
        // when its connection closed before (the caller sends it again).
        let kinds: Vec<Option<PipeErrorKind>> = results
            .into_iter()
            .map(|r| r.err().map(|e| e.kind))
            .collect();
        assert_eq!(kinds[0], Some(PipeErrorKind::Timeout));
        assert!(
            kinds
                .iter()
                .all(|k| matches!(k, Some(PipeErrorKind::Timeout | PipeErrorKind::NotSent))),
            "{kinds:?}"
        );
        Ok(())
    }

    #[test]
    fn an_answer_head_gives_its_end_to_end_headers_only() {
        let head = Bytes::from_static(
            b"HTTP/1.1 503 Service Unavailable\r\nConnection: x-hop, keep-alive\r\n\
              X-Hop: 1\r\nKeep-Alive: timeout=5\r\nTransfer-Encoding: chunked\r\n\
              Retry-After: 7\r\nSet-Cookie: a=1\r\nSet-Cookie: b=2\r\nContent-Length: 0\r\n\r\n",
        );
        let h = head_headers(&head);
        assert_eq!(h.len(), 3, "{h:?}");
        assert_eq!(h["retry-after"], "7");
        let cookies: Vec<_> = h.get_all("set-cookie").iter().collect();
        assert_eq!(cookies, ["a=1", "b=2"]);
    }

    #[test]
    fn an_answer_head_with_bare_line_feeds_and_padded_values_gives_the_same_headers() -> TestResult
    {
        let mut buf = BytesMut::from(
            &b"HTTP/1.1 200 OK\nServer:\tx/1 \r\nX-Empty:\nConnection: close\n\
               X-Colon: a:b \t\nContent-Length: 0\n\nNEXT"[..],
        );
        let Some(Some(p)) = parse_head(&mut buf)? else {
            return Err("a complete head was not parsed".into());
        };
        let h = head_headers(&p.head);
        assert_eq!(h.len(), 3, "{h:?}");
        assert_eq!(h["server"], "x/1");
        assert_eq!(h["x-empty"], "");
        assert_eq!(h["x-colon"], "a:b");
        assert_eq!(&buf[..], b"NEXT");
        Ok(())
    }

    /// RFC 9112 §6.3: a transfer coding other than chunked last is read
    /// until the target closes, whatever Content-Length says; framed by the
    /// length, the bytes after it were taken for the next pipelined answer.
    #[test]
    fn an_answer_with_a_transfer_coding_other_than_chunked_is_read_until_the_target_closes()
    -> TestResult {
        let mut b = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\nTransfer-Encoding: gzip\r\nContent-Length: 3\r\n\r\nabcdef"[..],
        );
        let p = parse_head(&mut b)?.flatten().ok_or("no head parsed")?;
        assert!(matches!(p.framing, Framing::UntilEof));
        assert!(p.close_after);
        Ok(())
    }

    #[test]
    fn heads_give_framing_and_close() -> TestResult {
        let mut b = BytesMut::from(
            &b"HTTP/1.1 200 OK\r\ncontent-length: 3\r\nconnection: close\r\nx-a: b\r\n\r\nabc"[..],
        );
        let p = parse_head(&mut b)?.flatten().ok_or("no head parsed")?;
        assert!(matches!(p.framing, Framing::Length(3)));
        assert!(p.close_after);
        let headers = head_headers(&p.head);
        assert!(headers.get("connection").is_none());
        assert!(headers.get("content-length").is_none());
        assert_eq!(headers["x-a"], "b");
        assert_eq!(&b[..], b"abc");
        let mut b =
            BytesMut::from(&b"HTTP/1.1 100 Continue\r\n\r\nHTTP/1.1 204 No Content\r\n\r\n"[..]);
        assert!(
            matches!(parse_head(&mut b)?, Some(None)),
            "100 Continue is skipped"
        );
        let p = parse_head(&mut b)?.flatten().ok_or("no head parsed")?;
        assert_eq!(p.status, StatusCode::NO_CONTENT);
        assert!(matches!(p.framing, Framing::Length(0)));
        Ok(())
    }
}
