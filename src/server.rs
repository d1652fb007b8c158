//! The listener loop: HTTP/1.1 and h2c (prior knowledge) on one port via
//! hyper-util's auto builder, a connection limit, a header-read timeout, and
//! graceful shutdown.
//!
//! The caller hands in a bound listener and a shutdown future (the pattern of
//! tokio's mini-redis), so tests bind port 0 and stop the server at will.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::{Duration, Instant};

use bytes::Bytes;
use futures::FutureExt;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Limits of one listener.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// How long shutdown waits for open connections to finish their requests.
    pub shutdown_timeout: Duration,
    /// Largest header block accepted (HTTP/1.1); larger gets 431.
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(30),
            max_header_bytes: 64 << 10,
        }
    }
}

/// The server TLS config in force, swapped on reload (certificate rotation).
#[derive(Clone, Debug)]
pub struct TlsSource(Arc<RwLock<Arc<rustls::ServerConfig>>>);

impl TlsSource {
    pub fn new(config: Arc<rustls::ServerConfig>) -> Self {
        TlsSource(Arc::new(RwLock::new(config)))
    }

    /// Replaces the config; connections accepted from now on use it.
    pub fn set(&self, config: Arc<rustls::ServerConfig>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = config;
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// Who sent a request, and when its first byte came.
#[derive(Debug, Clone, Copy)]
pub struct RequestInfo {
    pub remote: SocketAddr,
    /// When the first byte of the request arrived (HTTP/1.1: the first read
    /// after the previous request ended; HTTP/2, or a request pipelined
    /// behind another: when its head was complete). `server.request_timeout`
    /// counts from here: "whole request, headers and body".
    pub started: Instant,
}

/// Serves `listener` until `shutdown` completes, then stops accepting and
/// lets open connections finish (up to `limits.shutdown_timeout`).
pub async fn serve<H, F, RB>(
    listener: TcpListener,
    limits: Limits,
    tls: Option<TlsSource>,
    handler: H,
    connections: Option<prometheus::IntGauge>,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>, RequestInfo) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<RB>> + Send + 'static,
    RB: hyper::body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    // No hyper header-read timer: it allocates and arms a timer for every
    // request (3 % of the request path's instructions). The connection
    // sweeper below enforces `header_read_timeout` instead.
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(None)
        .max_buf_size(limits.max_header_bytes.max(8192))
        // hyper's default watches for the client's EOF while a request is
        // being answered, and drops the request's future when it comes:
        // a fork whose body was read would stop half-way (one target sent,
        // another's copy neither sent nor spooled). Half-close lets every
        // received request run to its outcome; the answer to a client that
        // has gone fails to write and the connection closes then. It also
        // spares a read attempt per request and the read buffer's
        // reallocation that went with it (5 % of the request's
        // instructions).
        .half_close(true)
        .keep_alive(true);
    // An HTTP/2 peer that stops answering PINGs (one that sent a preface
    // and then nothing) is closed instead of holding a connection slot.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(limits.header_read_timeout)
        .keep_alive_timeout(limits.header_read_timeout);
    let builder = Arc::new(builder);
    let max_connections = limits.max_connections.clamp(1, Semaphore::MAX_PERMITS);
    let slots = Arc::new(Semaphore::new(max_connections));
    let graceful = Arc::new(Graceful::default());
    let sweeper = tokio::spawn(sweep(Arc::downgrade(&graceful), limits.header_read_timeout));
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = &mut shutdown => break,
        };
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let activity = Arc::new(Activity::default());
        let service = {
            let activity = activity.clone();
            service_fn(move |req: Request<Incoming>| {
                let in_service = InService::enter(activity.clone());
                let started = activity.take_head_started().unwrap_or_else(Instant::now);
                // Made here and finished with `map`: an `async` block would
                // hold the request, or the handler's future, a second time.
                handler(req, RequestInfo { remote, started }).map(move |resp| {
                    in_service.answered(resp.body().size_hint().lower());
                    Ok::<_, Infallible>(resp)
                })
            })
        };
        let builder = builder.clone();
        let graceful = graceful.clone();
        let gauge = connections.clone();
        let tls = tls.as_ref().map(TlsSource::acceptor);
        let handshake_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            if let Some(g) = &gauge {
                g.inc();
            }
            let result = match tls {
                None => match with_preface(stream, handshake_timeout, activity.clone()).await {
                    Ok(io) => {
                        let conn = builder.serve_connection(TokioIo::new(io), service);
                        graceful.watch(conn, activity).await
                    }
                    Err(e) => Err(e.into()),
                },
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            match with_preface(tls_stream, handshake_timeout, activity.clone())
                                .await
                            {
                                Ok(io) => {
                                    let conn = builder.serve_connection(TokioIo::new(io), service);
                                    graceful.watch(conn, activity).await
                                }
                                Err(e) => Err(e.into()),
                            }
                        }
                        Ok(Err(e)) => Err(format!("TLS handshake failed: {e}").into()),
                        Err(_) => Err("TLS handshake timed out".into()),
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
            if let Some(g) = &gauge {
                g.dec();
            }
            drop(permit);
        });
    }
    drop(listener);
    sweeper.abort();
    graceful.start();
    // Every connection holds a slot until its task ends: all slots free
    // means every connection has finished.
    let all = u32::try_from(max_connections).unwrap_or(u32::MAX);
    tokio::select! {
        _ = slots.acquire_many(all) => {}
        () = tokio::time::sleep(limits.shutdown_timeout) => {
            tracing::warn!("shutdown timeout reached with connections still open");
        }
    }
}

/// The open connections, for graceful shutdown and for the
/// `header_read_timeout` sweeper, at no cost per request.
///
/// hyper-util's `GracefulShutdown` polls a `watch` channel every time a
/// connection is polled (about 900 instructions per request here). Instead,
/// each connection registers its task's waker once; [`Graceful::start`] sets
/// a flag and wakes them, and a connection that sees the flag when polled
/// starts hyper's graceful shutdown (finish the request in flight, then
/// close). The sweeper ([`sweep`]) reads each connection's [`Activity`].
#[derive(Default)]
struct Graceful {
    started: AtomicBool,
    next_id: AtomicU64,
    waiting: std::sync::Mutex<std::collections::HashMap<u64, Watched>>,
}

/// A connection as the shutdown and the sweeper see it.
struct Watched {
    waker: std::task::Waker,
    activity: Arc<Activity>,
    /// Requests started and writes at the last sweep.
    seen: (u64, u64),
    /// Sweeps since the connection last made progress.
    idle_sweeps: u32,
}

/// What a connection did, counted where it happens (the service and the
/// stream) and read by the sweeper: a few relaxed atomic operations per
/// request instead of a timer.
#[derive(Default)]
struct Activity {
    /// Requests handed to the service (their head was complete).
    started: AtomicU64,
    /// Requests whose service future ended (answered or dropped).
    done: AtomicU64,
    /// Bytes written.
    written: AtomicU64,
    /// The connection speaks HTTP/2: its writes are progress only while
    /// answers are still being sent (see [`Graceful::sweep`]).
    http2: AtomicBool,
    /// HTTP/2: bytes of the answers handed to hyper, with an allowance
    /// for their framing; answers are being sent while `written` is below.
    to_write: AtomicU64,
    /// Set by the sweeper: the connection is closed at its next poll.
    expired: AtomicBool,
    /// When the next request's first byte came ([`epoch`] nanoseconds + 1;
    /// 0: not known). Taken by the request when its head is complete.
    head_started: AtomicU64,
}

impl Activity {
    fn stamp_head_started(&self, at: Instant) {
        let nanos =
            u64::try_from(at.saturating_duration_since(epoch()).as_nanos()).unwrap_or(u64::MAX - 1);
        self.head_started.store(nanos + 1, Ordering::Relaxed);
    }

    fn take_head_started(&self) -> Option<Instant> {
        match self.head_started.swap(0, Ordering::Relaxed) {
            0 => None,
            n => epoch().checked_add(Duration::from_nanos(n - 1)),
        }
    }
}

/// The origin of the instants kept in atomics.
fn epoch() -> Instant {
    static EPOCH: std::sync::OnceLock<Instant> = std::sync::OnceLock::new();
    *EPOCH.get_or_init(Instant::now)
}

/// Marks a request in the service from its head until its answer.
struct InService(Arc<Activity>);

impl InService {
    fn enter(activity: Arc<Activity>) -> Self {
        activity.started.fetch_add(1, Ordering::Relaxed);
        InService(activity)
    }

    /// The request leaves the service with an answer of `body` bytes.
    fn answered(self, body: u64) {
        let a = &self.0;
        if a.http2.load(Ordering::Relaxed) {
            a.to_write
                .fetch_add(body.saturating_add(H2_FRAMING_ALLOWANCE), Ordering::Relaxed);
        }
    }
}

/// Bytes of HTTP/2 framing (HEADERS, DATA frame heads) allowed per answer
/// when the sweeper tells whether answers are still being sent.
const H2_FRAMING_ALLOWANCE: u64 = 1024;

impl Drop for InService {
    fn drop(&mut self) {
        self.0.done.fetch_add(1, Ordering::Relaxed);
    }
}

/// Sweeps per `header_read_timeout`: a connection is closed between one
/// timeout and 1.25 timeouts after it last made progress.
const SWEEPS_PER_TIMEOUT: u32 = 4;

/// `header_read_timeout`: closes connections that, for a whole timeout, had
/// no request in the service, started none and (HTTP/1.1) wrote nothing: a
/// client idle between requests, or one trickling a request head (bytes
/// received without a complete head do not count), or an HTTP/2 peer that
/// opens no stream, however often it pings. A request in the service is
/// bounded by `request_timeout` and the targets' timeouts instead.
async fn sweep(graceful: std::sync::Weak<Graceful>, timeout: Duration) {
    let period = (timeout / SWEEPS_PER_TIMEOUT).max(Duration::from_millis(10));
    let mut tick = tokio::time::interval_at(tokio::time::Instant::now() + period, period);
    tick.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
    loop {
        tick.tick().await;
        let Some(graceful) = graceful.upgrade() else {
            return;
        };
        graceful.sweep(SWEEPS_PER_TIMEOUT);
    }
}

impl Graceful {
    fn start(&self) {
        self.started.store(true, Ordering::Release);
        let wakers: Vec<std::task::Waker> = self
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .values()
            .map(|w| w.waker.clone())
            .collect();
        for w in wakers {
            w.wake();
        }
    }

    fn started(&self) -> bool {
        self.started.load(Ordering::Acquire)
    }

    /// Expires (and wakes) the connections idle for `limit` sweeps.
    fn sweep(&self, limit: u32) {
        let mut expired = Vec::new();
        {
            let mut conns = self.waiting.lock().unwrap_or_else(|p| p.into_inner());
            for w in conns.values_mut() {
                let a = &w.activity;
                let started = a.started.load(Ordering::Relaxed);
                let busy = started != a.done.load(Ordering::Relaxed);
                // HTTP/2 writes PING and SETTINGS acknowledgements (and its
                // own keep-alive PINGs): a peer that opens no stream and
                // pings would otherwise hold its slot for ever. Its writes
                // count only while answers are still being sent to it (the
                // peer's PINGs can only make that end sooner).
                let written = a.written.load(Ordering::Relaxed);
                let writes = if a.http2.load(Ordering::Relaxed)
                    && written >= a.to_write.load(Ordering::Relaxed)
                {
                    0
                } else {
                    written
                };
                let now = (started, writes);
                if busy || now != w.seen {
                    w.seen = now;
                    w.idle_sweeps = 0;
                } else {
                    w.idle_sweeps += 1;
                    if w.idle_sweeps >= limit {
                        a.expired.store(true, Ordering::Release);
                        expired.push(w.waker.clone());
                    }
                }
            }
        }
        for w in expired {
            w.wake();
        }
    }

    /// Serves `conn` until it ends; from [`Graceful::start`] on,
    /// gracefully. A connection the sweeper expires ends with an error.
    async fn watch<C, E>(self: Arc<Self>, conn: C, activity: Arc<Activity>) -> Result<(), E>
    where
        C: Future<Output = Result<(), E>> + GracefulConn,
        E: From<&'static str>,
    {
        let id = self.next_id.fetch_add(1, Ordering::Relaxed);
        let registered = Registered { graceful: self, id };
        tokio::pin!(conn);
        let mut waker: Option<std::task::Waker> = None;
        let mut shutting_down = false;
        std::future::poll_fn(move |cx| {
            if activity.expired.load(Ordering::Acquire) {
                // Requests start in this task: one that started after the
                // sweep looked keeps the connection.
                if activity.started.load(Ordering::Relaxed) == activity.done.load(Ordering::Relaxed)
                {
                    return Poll::Ready(Err(E::from("no request within header_read_timeout")));
                }
                activity.expired.store(false, Ordering::Release);
            }
            if !shutting_down {
                if waker.as_ref().is_none_or(|w| !w.will_wake(cx.waker())) {
                    // Once per connection (a task's waker does not change).
                    let mut conns = registered
                        .graceful
                        .waiting
                        .lock()
                        .unwrap_or_else(|p| p.into_inner());
                    match conns.get_mut(&registered.id) {
                        Some(w) => w.waker = cx.waker().clone(),
                        None => {
                            conns.insert(
                                registered.id,
                                Watched {
                                    waker: cx.waker().clone(),
                                    activity: activity.clone(),
                                    seen: (0, 0),
                                    idle_sweeps: 0,
                                },
                            );
                        }
                    }
                    waker = Some(cx.waker().clone());
                }
                // Read after registering: a start in between is not missed.
                if registered.graceful.started() {
                    shutting_down = true;
                    conn.as_mut().shut_down_gracefully();
                }
            }
            conn.as_mut().poll(cx)
        })
        .await
    }
}

/// Removes a connection's waker when it ends.
struct Registered {
    graceful: Arc<Graceful>,
    id: u64,
}

impl Drop for Registered {
    fn drop(&mut self) {
        self.graceful
            .waiting
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .remove(&self.id);
    }
}

/// A connection that can finish its request in flight and then close.
trait GracefulConn {
    fn shut_down_gracefully(self: Pin<&mut Self>);
}

impl<I, S, E> GracefulConn for auto::Connection<'_, I, S, E>
where
    S: hyper::service::HttpService<Incoming>,
    S::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    S::ResBody: hyper::body::Body + Send + 'static,
    <S::ResBody as hyper::body::Body>::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
    I: hyper::rt::Read + hyper::rt::Write + Unpin + 'static,
    E: hyper::rt::bounds::Http2ServerConnExec<S::Future, S::ResBody>,
{
    fn shut_down_gracefully(self: Pin<&mut Self>) {
        self.graceful_shutdown();
    }
}

/// The first bytes of an HTTP/2 connection with prior knowledge (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads a connection's first bytes within `timeout` and hands back a stream
/// that replays them.
///
/// hyper-util's auto builder reads them too, to tell HTTP/1.1 from an HTTP/2
/// preface, but without a deadline, and hyper's own header timeout starts
/// only after that: a client that connects and sends nothing, or trickles
/// the preface, would hold a connection slot for ever. This bounds that
/// phase by `header_read_timeout` as well.
async fn with_preface<S>(
    mut io: S,
    timeout: Duration,
    activity: Arc<Activity>,
) -> Result<Prefixed<S>, String>
where
    S: AsyncRead + Unpin,
{
    let read = async {
        let mut prefix = Vec::with_capacity(H2_PREFACE.len());
        let mut chunk = [0u8; H2_PREFACE.len()];
        // Up to the whole preface, stopping at the first byte that differs.
        while prefix.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&prefix) {
            let n = io
                .read(&mut chunk[..H2_PREFACE.len() - prefix.len()])
                .await?;
            if n == 0 {
                break;
            }
            if prefix.is_empty() {
                activity.stamp_head_started(Instant::now());
            }
            prefix.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(prefix)
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(prefix)) => {
            // HTTP/2 streams overlap: their start is when their head is
            // complete, not a read of the connection.
            let http1 = prefix.as_slice() != H2_PREFACE;
            if !http1 {
                activity.take_head_started();
                activity.http2.store(true, Ordering::Relaxed);
            }
            Ok(Prefixed {
                prefix,
                pos: 0,
                io,
                activity,
                stamp_heads: http1,
                stamped_after: Some(0),
            })
        }
        Ok(Err(e)) => Err(format!("reading the first bytes failed: {e}")),
        Err(_) => Err("no request within header_read_timeout".into()),
    }
}

/// A stream whose first bytes were read already: they are read again first.
/// Counts its writes for the sweeper and, for HTTP/1.1, notes when each
/// request's first byte arrives.
struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    io: S,
    activity: Arc<Activity>,
    /// HTTP/1.1: requests follow one another on the connection.
    stamp_heads: bool,
    /// The count of ended requests when the last request start was noted:
    /// the first read after the next request ends notes the one after it.
    stamped_after: Option<u64>,
}

impl<S> Prefixed<S> {
    fn count(&self, r: Poll<std::io::Result<usize>>) -> Poll<std::io::Result<usize>> {
        if let Poll::Ready(Ok(n)) = &r
            && *n > 0
        {
            self.activity
                .written
                .fetch_add(*n as u64, Ordering::Relaxed);
        }
        r
    }
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        let before = buf.filled().len();
        let r = Pin::new(&mut this.io).poll_read(cx, buf);
        if this.stamp_heads && matches!(r, Poll::Ready(Ok(()))) && buf.filled().len() > before {
            let a = &this.activity;
            let done = a.done.load(Ordering::Relaxed);
            if a.started.load(Ordering::Relaxed) == done && this.stamped_after != Some(done) {
                // No request in the service: these are the next one's
                // first bytes (one clock reading per request).
                a.stamp_head_started(Instant::now());
                this.stamped_after = Some(done);
            }
        }
        r
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write(cx, buf);
        self.count(r)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        let r = Pin::new(&mut self.io).poll_write_vectored(cx, bufs);
        self.count(r)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[tokio::test]
    async fn the_first_bytes_are_read_and_replayed_in_order() -> TestResult {
        for sent in [
            &b"POST / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"PRI * HTTP/1.1\r\n",
            H2_PREFACE,
            b"PRI",
            b"",
        ] {
            let (mut client, server) = tokio::io::duplex(64);
            tokio::io::AsyncWriteExt::write_all(&mut client, sent).await?;
            drop(client);
            let mut p = with_preface(server, Duration::from_secs(5), Arc::default()).await?;
            let mut all = Vec::new();
            p.read_to_end(&mut all).await?;
            assert_eq!(all, sent, "every byte is replayed, in order");
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_client_that_sends_nothing_or_half_a_preface_is_refused_after_the_timeout()
    -> TestResult {
        for sent in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
            let (mut client, server) = tokio::io::duplex(64);
            tokio::io::AsyncWriteExt::write_all(&mut client, sent).await?;
            let r = with_preface(server, Duration::from_millis(50), Arc::default()).await;
            assert!(r.is_err(), "{sent:?}");
            drop(client);
        }
        Ok(())
    }
}
