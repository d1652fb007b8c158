//! The fork: what one client request gets (SPEC.md, "What a request gets").
//!
//! 1. methods: forked, passed through (GET/HEAD to the active target), 405, 415;
//! 2. body: reserve its size from `max_inflight_bytes`, read it whole;
//! 3. admission against the spools of targets that are not `up`, before any byte is sent;
//! 4. send the same refcounted `Bytes` to every selected target concurrently;
//! 5. an outcome per target: delivered, rejected, spooled or dropped;
//! 6. the answer.

use std::future::Future;
use std::net::IpAddr;
use std::pin::Pin;
use std::sync::atomic::{AtomicBool, AtomicUsize, Ordering};
use std::sync::{Arc, RwLock};
use std::task::Poll;
use std::time::{Duration, Instant, SystemTime};

use bytes::{Bytes, BytesMut};
use futures::FutureExt;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full};
use tokio::sync::{OwnedSemaphorePermit, Semaphore};
use tracing::Instrument;

use crate::config::{Config, Mode};
use crate::metrics::Metrics;
use crate::spool::{Record, Reservation, truncate_to_millis};
use crate::target::{Admission, TargetRuntime};
use crate::upstream::{self, Answer, Attempt, X_REQUEST_ID};

/// Where the active target came from, shown in `/status`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ActiveSource {
    Config,
    Admin,
}

impl ActiveSource {
    pub fn as_str(self) -> &'static str {
        match self {
            ActiveSource::Config => "config",
            ActiveSource::Admin => "admin",
        }
    }
}

/// The routing in force: swapped whole on reload or switch, so a request in
/// flight finishes under the routing it started with.
#[derive(Debug)]
pub struct Routing {
    pub config: Arc<Config>,
    pub active: String,
    pub active_source: ActiveSource,
    /// Every configured target, in name order.
    pub targets: Vec<Arc<TargetRuntime>>,
}

impl Routing {
    pub fn target(&self, name: &str) -> Option<&Arc<TargetRuntime>> {
        self.targets.iter().find(|t| t.name == name)
    }

    /// Targets that receive new forked requests (a slice: no allocation
    /// per request).
    pub fn selected(&self) -> &[Arc<TargetRuntime>] {
        match self.config.raw.routing.mode {
            Mode::ActiveActive => &self.targets,
            Mode::ActivePassive => self.target(&self.active).map_or(&[], std::slice::from_ref),
        }
    }

    pub fn is_selected(&self, name: &str) -> bool {
        self.config.raw.routing.mode == Mode::ActiveActive || name == self.active
    }
}

/// Bytes of request bodies held in memory, bounded by `max_inflight_bytes`.
/// Counted in KiB so a 4 GiB budget fits the semaphore's u32 requests.
/// A body read chunk by chunk reserves the units its running total needs,
/// not a unit per chunk: a client sending one-byte chunks holds what it
/// sent, rounded up once.
#[derive(Debug)]
pub struct Budget {
    sem: Arc<Semaphore>,
    /// Units the budget was made with (fixed until restart).
    capacity: u32,
}

const BUDGET_UNIT: u64 = 1024;
/// Content type refused with 415 (compared ignoring case).
const GRPC: &[u8] = b"application/grpc";

fn units(bytes: u64) -> u32 {
    u32::try_from(bytes.div_ceil(BUDGET_UNIT)).unwrap_or(u32::MAX)
}

impl Budget {
    pub fn new(max_bytes: u64) -> Self {
        // `units` is a u32, far below `Semaphore::MAX_PERMITS` (2^61).
        let capacity = units(max_bytes);
        Budget {
            sem: Arc::new(Semaphore::new(capacity as usize)),
            capacity,
        }
    }

    /// The bytes this budget holds in all.
    pub fn capacity_bytes(&self) -> u64 {
        u64::from(self.capacity) * BUDGET_UNIT
    }

    /// `n` more units. `None` at once when `n` is more than the whole
    /// budget: waiting could only end in the deadline, holding every unit
    /// it took meanwhile and stalling every other request.
    async fn acquire_units(&self, n: u32) -> Option<OwnedSemaphorePermit> {
        if n > self.capacity {
            return None;
        }
        self.sem.clone().acquire_many_owned(n).await.ok()
    }
}

/// The request handler shared by every connection.
pub struct Fork {
    routing: RwLock<Arc<Routing>>,
    budget: Budget,
    metrics: Metrics,
    /// Requests being forked (shutdown waits for them to be sent or spooled).
    in_flight: Arc<AtomicUsize>,
    /// Set at shutdown before the wait for `in_flight`: a request whose
    /// body is read after that is refused, not forked against spools that
    /// are about to close.
    closed: AtomicBool,
}

/// Counts a request in [`Fork::in_flight`] while it lives, dropped or not
/// (or while the task that finishes its copies lives, see [`Copies`]).
struct InFlight(Arc<AtomicUsize>);

impl InFlight {
    fn enter(n: &Arc<AtomicUsize>) -> Self {
        // SeqCst, with `Fork::closed`: see `Fork::close`.
        n.fetch_add(1, Ordering::SeqCst);
        InFlight(n.clone())
    }
}

impl Drop for InFlight {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::AcqRel);
    }
}

impl std::fmt::Debug for Fork {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Fork").finish_non_exhaustive()
    }
}

type Resp = Response<Full<Bytes>>;

/// What happened to one target's copy.
enum Outcome {
    Answered(Answer),
    Rejected(Answer),
    Spooled,
    Dropped,
    /// The copy could not be spooled (disk error).
    Failed,
}

impl Fork {
    pub fn new(routing: Arc<Routing>, max_inflight_bytes: u64, metrics: Metrics) -> Self {
        Fork {
            routing: RwLock::new(routing),
            budget: Budget::new(max_inflight_bytes),
            metrics,
            in_flight: Arc::new(AtomicUsize::new(0)),
            closed: AtomicBool::new(false),
        }
    }

    /// The bytes of request bodies held at once (`max_inflight_bytes` as
    /// forkd started: a reload does not change it).
    pub fn budget_bytes(&self) -> u64 {
        self.budget.capacity_bytes()
    }

    /// The routing in force.
    pub fn routing(&self) -> Arc<Routing> {
        self.routing
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Swaps in a new routing (reload or switch) and updates `forkd_target_selected`.
    pub fn set_routing(&self, routing: Arc<Routing>) {
        for t in &routing.targets {
            t.set_selected(routing.is_selected(&t.name));
            t.apply_role(t.name == routing.active);
        }
        *self.routing.write().unwrap_or_else(|p| p.into_inner()) = routing;
    }

    /// Requests whose body is read and whose copies are being sent or
    /// spooled now.
    pub fn in_flight(&self) -> usize {
        self.in_flight.load(Ordering::SeqCst)
    }

    /// Refuses (503) every request whose body is read from now on; call
    /// before waiting for [`Fork::in_flight`] to reach zero at shutdown.
    ///
    /// Without it, a client still sending its body when the shutdown bound
    /// passed keeps its connection, and a body completing before the process
    /// exits was forked against closed spools: the active target's 2xx was
    /// relayed while the backup's copy could not be kept. A request enters
    /// `in_flight` and then reads `closed`, shutdown sets `closed` and then
    /// reads `in_flight` (all SeqCst): either the request sees `closed`, or
    /// shutdown sees the request and waits for it.
    pub fn close(&self) {
        self.closed.store(true, Ordering::SeqCst);
    }

    /// Handles one client request and counts the answer.
    ///
    /// `started`: when the request's first byte arrived; `request_timeout`
    /// counts from it (the whole request, headers and body).
    ///
    /// Not an `async fn`: the request goes into [`Fork::route`]'s future
    /// only, not into this one's as well (every request's future is moved a
    /// few times before it runs; docs/performance.md items 29–30).
    pub fn handle<B>(
        self: Arc<Self>,
        req: Request<B>,
        client: Option<IpAddr>,
        started: Instant,
    ) -> impl Future<Output = Resp>
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let accepted = SystemTime::now();
        let routing = self.routing();
        let (request_id, id_header) = request_id_and_header(req.headers(), accepted);
        // A debug span: at the default level (info) it costs nothing, where an
        // info span formatted its fields on every request. Events logged
        // during a request name its request id themselves.
        let span = tracing::debug_span!("request", id = %request_id, method = %req.method(), path = %req.uri().path());
        // `map`, not an `async` block: awaiting a captured future keeps a
        // second copy of it in the block's state.
        Arc::clone(&self)
            .route(req, client, routing, request_id, (started, accepted))
            .instrument(span.clone())
            .map(move |mut resp| {
                if let Some(v) = id_header {
                    resp.headers_mut().insert(&X_REQUEST_ID, v);
                }
                self.metrics.count_response(resp.status());
                self.metrics
                    .request_duration
                    .observe(started.elapsed().as_secs_f64());
                tracing::debug!(parent: &span, status = resp.status().as_u16(), "answered");
                resp
            })
    }

    async fn route<B>(
        self: Arc<Self>,
        req: Request<B>,
        client: Option<IpAddr>,
        routing: Arc<Routing>,
        request_id: String,
        (started, accepted): (Instant, SystemTime),
    ) -> Resp
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        let cfg = &routing.config;
        let server = &cfg.raw.server;
        if !authorized(&server.auth_tokens, req.headers()) {
            let mut r = plain(
                StatusCode::UNAUTHORIZED,
                "missing or invalid bearer token\n",
            );
            r.headers_mut()
                .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
            return r;
        }
        let method = req.method().clone();
        if method == Method::GET || method == Method::HEAD {
            // Boxed: the pass-through's future is large and the path rare.
            return Box::pin(self.pass_through(req, client, &routing, &request_id)).await;
        }
        if !cfg.methods.contains(&method) {
            let mut allow: Vec<&str> = cfg.methods.iter().map(Method::as_str).collect();
            allow.extend(["GET", "HEAD"]);
            let mut r = plain(StatusCode::METHOD_NOT_ALLOWED, "method not allowed\n");
            if let Ok(v) = HeaderValue::from_str(&allow.join(", ")) {
                r.headers_mut().insert(header::ALLOW, v);
            }
            return r;
        }
        if req
            .headers()
            .get(header::CONTENT_TYPE)
            .and_then(|v| v.to_str().ok())
            .is_some_and(|ct| {
                // Compared in place: no lowercased copy per request.
                ct.trim_start()
                    .as_bytes()
                    .get(..GRPC.len())
                    .is_some_and(|p| p.eq_ignore_ascii_case(GRPC))
            })
        {
            return plain(
                StatusCode::UNSUPPORTED_MEDIA_TYPE,
                "gRPC is not supported; use OTLP/HTTP\n",
            );
        }
        let max_body = server.max_body_size.as_u64();
        // hyper knows the declared length (Content-Length, validated).
        let declared = req.body().size_hint().exact();
        if declared.is_some_and(|n| n > max_body) {
            return too_large(max_body);
        }
        let deadline = started_deadline(started, server.request_timeout);
        // In a block: its locals take no room in the future while the
        // copies run (the future is moved a few times before it is polled).
        let (record, budget) = {
            let (parts, body) = req.into_parts();
            let (body, budget) = match self.read_body(body, declared, max_body, deadline).await {
                Ok(v) => v,
                Err(resp) => return resp,
            };
            self.metrics.request_bytes.inc_by(body.len() as u64);
            let Some(path_and_query) = parts.uri.into_parts().path_and_query else {
                return plain(StatusCode::BAD_REQUEST, "request has no path\n");
            };
            let record = Record {
                accepted_at: truncate_to_millis(accepted),
                request_id,
                method,
                path_and_query,
                headers: upstream::end_to_end_headers(parts.headers, client),
                body,
            };
            (record, budget)
        };
        self.fork(record, &routing, budget).await
    }

    /// Reads the whole body within the budget, the size limit and the deadline.
    async fn read_body<B>(
        &self,
        mut body: B,
        declared: Option<u64>,
        max_body: u64,
        deadline: Instant,
    ) -> Result<(Bytes, Inflight), Resp>
    where
        B: hyper::body::Body<Data = Bytes> + Unpin,
        B::Error: std::fmt::Display,
    {
        // One permit: later reservations (a body without Content-Length,
        // read chunk by chunk) are merged into it.
        let mut permit: Option<OwnedSemaphorePermit> = None;
        // Bytes counted in `forkd_inflight_bytes`, and budget units held.
        let mut held: u64 = 0;
        let mut held_units: u32 = 0;
        if let Some(n) = declared {
            held_units = units(n).max(1);
            permit = Some(self.reserve_budget(held_units, deadline).await?);
            held = n;
        }
        let mut first: Option<Bytes> = None;
        let mut buf = BytesMut::new();
        let mut total: u64 = 0;
        loop {
            let frame = match tokio::time::timeout_at(deadline.into(), body.frame()).await {
                Err(_) => {
                    return Err(plain(
                        StatusCode::REQUEST_TIMEOUT,
                        "request body not received in time\n",
                    ));
                }
                Ok(None) => break,
                Ok(Some(Err(e))) => {
                    tracing::debug!(error = %e, "client body failed; nothing forwarded");
                    return Err(plain(
                        StatusCode::BAD_REQUEST,
                        "request body could not be read\n",
                    ));
                }
                Ok(Some(Ok(frame))) => frame,
            };
            let Ok(data) = frame.into_data() else {
                continue;
            };
            total += data.len() as u64;
            if total > max_body {
                return Err(too_large(max_body));
            }
            if total > held {
                let needed = units(total);
                if needed > held_units {
                    let more = self.reserve_budget(needed - held_units, deadline).await?;
                    match permit.as_mut() {
                        Some(p) => p.merge(more),
                        None => permit = Some(more),
                    }
                    held_units = needed;
                }
                held = total;
            }
            match first.take() {
                None if buf.is_empty() => first = Some(data),
                None => buf.extend_from_slice(&data),
                Some(prev) => {
                    buf.reserve(declared.map_or(prev.len() + data.len(), |n| n as usize));
                    buf.extend_from_slice(&prev);
                    buf.extend_from_slice(&data);
                }
            }
        }
        let body = first.unwrap_or_else(|| buf.freeze());
        Ok((
            body,
            Inflight::new(permit, held, &self.metrics.inflight_bytes),
        ))
    }

    async fn reserve_budget(
        &self,
        units: u32,
        deadline: Instant,
    ) -> Result<OwnedSemaphorePermit, Resp> {
        match tokio::time::timeout_at(deadline.into(), self.budget.acquire_units(units)).await {
            Ok(Some(p)) => Ok(p),
            _ => Err(unavailable(
                "too much request data in flight; retry later\n",
            )),
        }
    }

    /// Admission, dispatch and the answer for a request whose body is read;
    /// `budget` holds the body's share of `max_inflight_bytes` until every
    /// copy has its outcome.
    async fn fork(&self, record: Record, routing: &Arc<Routing>, budget: Inflight) -> Resp {
        let counted = InFlight::enter(&self.in_flight);
        if self.closed.load(Ordering::SeqCst) {
            return unavailable("shutting down; retry later\n");
        }
        let cfg = &routing.config;
        let selected = routing.selected();
        if selected.is_empty() {
            return unavailable("no target selected\n");
        }
        let size = record.encoded_len();
        let refused = |t: &TargetRuntime, record: &Record| {
            tracing::warn!(target = %t.name, request_id = %record.request_id, "spool full; request refused");
            unavailable("spool full; retry later\n")
        };
        let active = routing.active.as_str();
        if let [t] = selected {
            // One target (active-passive, or a single target): no join of
            // copies, no vectors. (If the client leaves first, nothing is
            // left half-done across targets: a live send already handed to
            // the connection still goes out, unanswered.)
            let admission = match t.admit(size) {
                Admission::Full => return refused(t, &record),
                a => a,
            };
            // Boxed: inline, the copy's future (490 bytes) would grow every
            // request's future, which is moved a few times before it runs.
            let outcome = Box::pin(copy(t, Arc::new(record), admission, Instant::now())).await;
            return self.answer(cfg, selected, active, [outcome]);
        }
        let record = Arc::new(record);
        // One clock read for every copy's deadline and latency.
        let started = Instant::now();
        let copy_for = |t: &Arc<TargetRuntime>, admission: Admission| {
            let (t, record) = (t.clone(), record.clone());
            match admission {
                Admission::Full => Copy::Done(Outcome::Failed),
                Admission::Dropped => Copy::Done(Outcome::Dropped),
                Admission::Spool(reservation) => {
                    Copy::Spooling(Box::pin(
                        async move { spool(&t, reservation, &record).await },
                    ))
                }
                Admission::Live => {
                    Copy::Live(Box::pin(
                        async move { send_copy(&t, &record, started).await },
                    ))
                }
            }
        };
        // The copies are made as each target admits the request (a future
        // does nothing until polled); a refusal drops them, and with them
        // the spool reservations made so far. A target whose admission
        // would drop a spooled record (its spool full under `drop_newest`
        // or `drop_oldest`) is admitted last: if another target's spool
        // refuses the request (`reject`), it has lost nothing for it.
        let mut copies = Vec::with_capacity(selected.len());
        let mut last = Vec::new();
        for (i, t) in selected.iter().enumerate() {
            copies.push(Entry::new(match t.admit_lossless(size) {
                Some(Admission::Full) => return refused(t, &record),
                Some(admission) => copy_for(t, admission),
                None => {
                    last.push(i);
                    Copy::Done(Outcome::Failed)
                }
            }));
        }
        // (`Full` here only if a reload made such a target `reject` in
        // between: the two passes are not one atomic step.)
        for i in last {
            if let (Some(t), Some(entry)) = (selected.get(i), copies.get_mut(i)) {
                entry.copy = match t.admit(size) {
                    Admission::Full => return refused(t, &record),
                    admission => copy_for(t, admission),
                };
            }
        }
        // Counted once every target has admitted the request.
        for (t, entry) in selected.iter().zip(&copies) {
            if matches!(entry.copy, Copy::Done(Outcome::Dropped)) {
                t.count_result("dropped");
            }
        }
        let mut copies = Copies {
            copies,
            routing: routing.clone(),
            record,
            active: selected.iter().position(|t| t.name == active),
            // Only active-active forks to several targets. Non-active copies
            // may hold the answer back at most `secondary_wait` after the
            // active copy has its outcome.
            wait: Wait::After(cfg.raw.routing.secondary_wait),
            held: Some((counted, budget)),
            detached: false,
        };
        copies.join().await;
        let outcomes = std::mem::take(&mut copies.copies)
            .into_iter()
            .map(|e| match e.copy {
                Copy::Done(outcome) => outcome,
                Copy::Live(_) | Copy::Spooling(_) => Outcome::Failed,
            });
        self.answer(cfg, selected, active, outcomes)
    }

    fn answer(
        &self,
        cfg: &Config,
        selected: &[Arc<TargetRuntime>],
        active: &str,
        outcomes: impl IntoIterator<Item = Outcome>,
    ) -> Resp {
        let mut active_outcome = None;
        let mut other_answer = None;
        for (t, outcome) in selected.iter().zip(outcomes) {
            if t.name == active {
                active_outcome = Some(outcome);
            } else if other_answer.is_none()
                && let Outcome::Answered(a) | Outcome::Rejected(a) = outcome
            {
                other_answer = Some(a);
            }
        }
        match active_outcome {
            Some(Outcome::Answered(a) | Outcome::Rejected(a)) => return relay(a),
            Some(Outcome::Dropped | Outcome::Failed) => {
                return unavailable("the request could not be kept; retry later\n");
            }
            _ => {}
        }
        if let Some(a) = other_answer {
            return relay(a);
        }
        let status =
            StatusCode::from_u16(cfg.raw.routing.spooled_status).unwrap_or(StatusCode::ACCEPTED);
        let mut r = Response::new(Full::new(Bytes::new()));
        *r.status_mut() = status;
        r
    }

    /// GET and HEAD: to the active target only, never spooled; 502 when it is not up.
    async fn pass_through<B>(
        &self,
        req: Request<B>,
        client: Option<IpAddr>,
        routing: &Routing,
        request_id: &str,
    ) -> Resp {
        let Some(target) = routing.target(&routing.active) else {
            return plain(StatusCode::BAD_GATEWAY, "no active target\n");
        };
        if target.state() != crate::target::State::Up {
            return plain(StatusCode::BAD_GATEWAY, "active target is not up\n");
        }
        let (parts, _) = req.into_parts();
        let Some(pq) = parts.uri.path_and_query().cloned() else {
            return plain(StatusCode::BAD_REQUEST, "request has no path\n");
        };
        let headers = upstream::end_to_end_headers(parts.headers, client);
        let conf = target.conf();
        match upstream::pass_through(
            &conf.client,
            &conf.target,
            parts.method.clone(),
            &pq,
            headers,
            request_id,
        )
        .await
        {
            Ok(answer) => {
                let mut r = relay(answer);
                if parts.method == Method::HEAD {
                    *r.body_mut() = Full::new(Bytes::new());
                }
                r
            }
            Err(e) => {
                tracing::info!(target = %target.name, error = %e, "pass-through failed");
                plain(StatusCode::BAD_GATEWAY, "active target did not answer\n")
            }
        }
    }
}

/// One copy of a request under [`Copies`].
enum Copy<F> {
    /// Its live send ([`send_copy`]).
    Live(Pin<Box<F>>),
    /// Being appended to its target's spool: admitted so, or its live send
    /// failed or was abandoned.
    Spooling(Pin<Box<dyn Future<Output = Outcome> + Send>>),
    Done(Outcome),
}

/// A copy under [`Copies`], with its waker.
struct Entry<F> {
    copy: Copy<F>,
    wake: CopyWake,
}

impl<F> Entry<F> {
    fn new(copy: Copy<F>) -> Self {
        let slot = Arc::new(Slot {
            // Polled once at the start.
            woken: AtomicBool::new(true),
            task: futures::task::AtomicWaker::new(),
        });
        Entry {
            copy,
            wake: CopyWake {
                waker: std::task::Waker::from(slot.clone()),
                slot,
            },
        }
    }
}

/// The waker a copy's future is polled with, and its state.
struct CopyWake {
    slot: Arc<Slot>,
    waker: std::task::Waker,
}

impl CopyWake {
    /// Whether the copy was woken since it was last polled (and clears
    /// it); registers the request's task with it.
    fn take_woken(&self, task: &std::task::Waker) -> bool {
        self.slot.task.register(task);
        self.slot.woken.swap(false, Ordering::SeqCst)
    }

    /// Marks the copy to be polled without a wake-up.
    fn wake_here(&self) {
        self.slot.woken.store(true, Ordering::SeqCst);
    }
}

/// One copy's wake-up: remembered (the next pass of the join polls that
/// copy) and passed on to the request's task.
///
/// Every wake-up is passed on, the non-active copies' too: a woken copy
/// may have a step of its own to take (a request not sent, sent again;
/// a TLS handshake; its own timeout), which must not wait for the active
/// copy's outcome.
struct Slot {
    woken: AtomicBool,
    task: futures::task::AtomicWaker,
}

impl std::task::Wake for Slot {
    fn wake(self: Arc<Self>) {
        self.wake_by_ref();
    }

    fn wake_by_ref(self: &Arc<Self>) {
        self.woken.store(true, Ordering::SeqCst);
        self.task.wake();
    }
}

/// Where a request's `secondary_wait` is.
#[derive(Clone, Copy)]
enum Wait {
    /// The active copy is still running: the others may take this long
    /// after it has its outcome.
    After(Duration),
    /// The active copy has its outcome: live sends still running at this
    /// instant are abandoned and spooled.
    Until(Instant),
    /// No (more) waiting to bound: passed already, or too long to bound.
    Passed,
}

/// A `secondary_wait` longer than this is as good as for ever (and keeps
/// the deadline far from the end of the clock's range).
const FOREVER: Duration = Duration::from_secs(365 * 86_400);

/// The copies of a request forked to several targets, run to their
/// outcomes by [`Copies::join`].
///
/// Dropped before every copy has its outcome (an HTTP/2 client reset its
/// stream, or its connection closed, while forkd waited for a target), it
/// hands the copies still running to a task of their own: a fork never
/// stops half-way, with the request sent to one target and neither sent nor
/// spooled for another. The copies run on as if the client were still
/// there (`secondary_wait` included, as for an HTTP/1 client that left,
/// whose request runs on in its connection's task); the task keeps the
/// request counted in [`Fork::in_flight`] (shutdown waits for it) and keeps
/// the body's share of `max_inflight_bytes`.
struct Copies<F: Future<Output = Sent> + Send + 'static> {
    /// In the order of `routing.selected()`.
    copies: Vec<Entry<F>>,
    routing: Arc<Routing>,
    record: Arc<Record>,
    /// The active target's copy, whose outcome starts `secondary_wait`.
    active: Option<usize>,
    wait: Wait,
    /// The request's place in `Fork::in_flight` and its body budget.
    held: Option<(InFlight, Inflight)>,
    /// Run by the task of a dropped request: not handed on again.
    detached: bool,
}

impl<F: Future<Output = Sent> + Send + 'static> Copies<F> {
    /// Runs every copy to its outcome. Each copy has a waker of its own
    /// ([`Slot`]): a wake-up polls only the copies that were woken (not
    /// every running copy). Once the active copy has its outcome, one
    /// timer bounds the others: live sends still running `secondary_wait`
    /// later are abandoned and spooled. A copy whose answer is in when the
    /// active copy finishes never arms the timer (every woken copy is
    /// polled before it is armed).
    async fn join(&mut self) {
        let mut timer = std::pin::pin!(None::<tokio::time::Sleep>);
        std::future::poll_fn(|cx| {
            loop {
                let mut running = false;
                for i in 0..self.copies.len() {
                    running |= self.poll_copy(i, cx).is_pending();
                }
                if !running {
                    return Poll::Ready(());
                }
                let until = match self.wait {
                    Wait::After(wait) => {
                        let active_done = self
                            .active
                            .and_then(|i| self.copies.get(i))
                            .is_some_and(|e| matches!(e.copy, Copy::Done(_)));
                        if !active_done {
                            return Poll::Pending;
                        }
                        let Some(until) = Instant::now().checked_add(wait.min(FOREVER)) else {
                            self.wait = Wait::Passed;
                            return Poll::Pending;
                        };
                        self.wait = Wait::Until(until);
                        until
                    }
                    Wait::Until(until) => until,
                    Wait::Passed => return Poll::Pending,
                };
                if timer.is_none() {
                    timer.set(Some(tokio::time::sleep_until(until.into())));
                }
                if timer
                    .as_mut()
                    .as_pin_mut()
                    .is_none_or(|t| t.poll(cx).is_pending())
                {
                    return Poll::Pending;
                }
                self.wait = Wait::Passed;
                self.abandon_live();
            }
        })
        .await;
    }

    /// Polls copy `i`, if it was woken, until it is pending or done; a
    /// live send that failed goes on to the spool at once. The request's
    /// task (`cx`) is what the copy's waker wakes.
    fn poll_copy(&mut self, i: usize, cx: &mut std::task::Context<'_>) -> Poll<()> {
        let Some(Entry { copy: c, wake }) = self.copies.get_mut(i) else {
            return Poll::Ready(());
        };
        if matches!(c, Copy::Done(_)) {
            return Poll::Ready(());
        }
        if !wake.take_woken(cx.waker()) {
            return Poll::Pending;
        }
        let cx = &mut std::task::Context::from_waker(&wake.waker);
        loop {
            match c {
                Copy::Live(f) => match f.as_mut().poll(cx) {
                    Poll::Ready(Sent::Done(outcome)) => *c = Copy::Done(outcome),
                    Poll::Ready(Sent::ToSpool(reservation)) => {
                        let Some(t) = self.routing.selected().get(i) else {
                            *c = Copy::Done(Outcome::Failed);
                            continue;
                        };
                        let (t, record) = (t.clone(), self.record.clone());
                        *c = Copy::Spooling(Box::pin(async move {
                            spool_after_failure(&t, reservation, &record).await
                        }));
                    }
                    Poll::Pending => return Poll::Pending,
                },
                Copy::Spooling(f) => match f.as_mut().poll(cx) {
                    Poll::Ready(outcome) => *c = Copy::Done(outcome),
                    Poll::Pending => return Poll::Pending,
                },
                Copy::Done(_) => return Poll::Ready(()),
            }
        }
    }

    /// `secondary_wait` has passed: the live sends still running are given
    /// up and their copies spooled (the target has a backlog now). Copies
    /// already on their way to the spool are left to finish.
    fn abandon_live(&mut self) {
        let targets = self.routing.selected();
        for (Entry { copy: c, wake }, t) in self.copies.iter_mut().zip(targets) {
            if !matches!(c, Copy::Live(_)) {
                continue;
            }
            // Polled by the same pass of the join.
            wake.wake_here();
            tracing::info!(
                target = %t.name, request_id = %self.record.request_id,
                "secondary_wait passed after the active target answered; spooling this copy"
            );
            t.count_abandoned();
            let reservation = t.abandon_to_backlog(self.record.encoded_len());
            let (t, record) = (t.clone(), self.record.clone());
            *c = Copy::Spooling(Box::pin(async move {
                spool_after_failure(&t, reservation, &record).await
            }));
        }
    }
}

impl<F: Future<Output = Sent> + Send + 'static> Drop for Copies<F> {
    fn drop(&mut self) {
        // A panic in a copy: its future cannot be polled again.
        if self.detached
            || std::thread::panicking()
            || self.copies.iter().all(|e| matches!(e.copy, Copy::Done(_)))
        {
            return;
        }
        // No runtime: the process is ending, and the copies with it.
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return;
        };
        let mut rest = Copies {
            copies: std::mem::take(&mut self.copies),
            routing: self.routing.clone(),
            record: self.record.clone(),
            active: self.active,
            wait: self.wait,
            held: self.held.take(),
            detached: true,
        };
        runtime.spawn(async move { rest.join().await });
    }
}

/// One target's copy when it is the only one: live with fallback to the
/// spool, or straight to the spool.
async fn copy(
    t: &TargetRuntime,
    record: Arc<Record>,
    admission: Admission,
    started: Instant,
) -> Outcome {
    match admission {
        Admission::Full => Outcome::Failed,
        Admission::Dropped => {
            t.count_result("dropped");
            Outcome::Dropped
        }
        Admission::Spool(reservation) => spool(t, reservation, &record).await,
        Admission::Live => match send_copy(t, &record, started).await {
            Sent::Done(outcome) => outcome,
            Sent::ToSpool(reservation) => spool_after_failure(t, reservation, &record).await,
        },
    }
}

/// How a copy's live send ended.
enum Sent {
    Done(Outcome),
    /// It failed in a way worth retrying: the target was marked down and
    /// room for the copy reserved in its spool, in one step
    /// ([`TargetRuntime::fail_live`]); `None` when the copy is dropped.
    ToSpool(Option<Reservation>),
}

/// A copy's live send.
async fn send_copy(t: &TargetRuntime, record: &Record, started: Instant) -> Sent {
    match t.send_live(record, started).await {
        Attempt::Delivered(a) => {
            t.count_result("delivered");
            Sent::Done(Outcome::Answered(a))
        }
        Attempt::Rejected(a) => {
            // Boxed: a rare path that should not size every copy's future.
            Box::pin(t.keep_rejected(record, &a)).await;
            Sent::Done(Outcome::Rejected(a))
        }
        Attempt::Transient {
            reason,
            detail,
            retry_after,
            ..
        } => {
            tracing::info!(
                target = %t.name, request_id = %record.request_id,
                reason = reason.as_str(), %detail, "live send failed; spooling"
            );
            Sent::ToSpool(t.fail_live(record.encoded_len(), retry_after))
        }
    }
}

/// Spools a copy whose live send failed or was abandoned, within the room
/// reserved for it then (`None`: dropped).
async fn spool_after_failure(
    t: &TargetRuntime,
    reservation: Option<Reservation>,
    record: &Arc<Record>,
) -> Outcome {
    match reservation {
        Some(r) => spool(t, r, record).await,
        None => {
            t.count_result("dropped");
            Outcome::Dropped
        }
    }
}

async fn spool(t: &TargetRuntime, reservation: Reservation, record: &Arc<Record>) -> Outcome {
    match t.append(reservation, Arc::clone(record)).await {
        Ok(()) => Outcome::Spooled,
        Err(_) => Outcome::Failed,
    }
}

fn relay(a: Answer) -> Resp {
    let Some(body) = a.body else {
        return plain(StatusCode::BAD_GATEWAY, "target answer larger than 1 MiB\n");
    };
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = a.status;
    *r.headers_mut() = a.headers.into_map();
    r
}

fn plain(status: StatusCode, text: &'static str) -> Resp {
    let mut r = Response::new(Full::new(Bytes::from_static(text.as_bytes())));
    *r.status_mut() = status;
    r.headers_mut().insert(
        header::CONTENT_TYPE,
        HeaderValue::from_static("text/plain; charset=utf-8"),
    );
    r
}

fn unavailable(text: &'static str) -> Resp {
    let mut r = plain(StatusCode::SERVICE_UNAVAILABLE, text);
    r.headers_mut()
        .insert(header::RETRY_AFTER, HeaderValue::from_static("1"));
    r
}

fn too_large(max: u64) -> Resp {
    let mut r = plain(StatusCode::PAYLOAD_TOO_LARGE, "request body too large\n");
    if let Ok(v) = HeaderValue::from_str(&max.to_string()) {
        r.headers_mut().insert("x-forkd-max-body-size", v);
    }
    r
}

fn started_deadline(started: Instant, timeout: Duration) -> Instant {
    // A timeout too large for the clock: a day is forever enough.
    started
        .checked_add(timeout)
        .or_else(|| started.checked_add(Duration::from_secs(86_400)))
        .unwrap_or(started)
}

/// The request id (the client's `X-Request-Id` when it is a sane token, else
/// a new UUIDv7 timed at `now`) and its header value for the answer.
fn request_id_and_header(
    headers: &http::HeaderMap,
    now: SystemTime,
) -> (String, Option<HeaderValue>) {
    if let Some(v) = headers.get(&X_REQUEST_ID)
        && let Ok(s) = v.to_str()
        && !s.is_empty()
        && s.len() <= 128
        && s.bytes().all(|b| b.is_ascii_graphic())
    {
        return (s.to_owned(), Some(v.clone()));
    }
    let mut buf = [0u8; uuid::fmt::Hyphenated::LENGTH];
    let id: &str = new_uuid_v7(now).hyphenated().encode_lower(&mut buf);
    (id.to_owned(), HeaderValue::from_str(id).ok())
}

/// A UUIDv7 (RFC 9562): the Unix time in milliseconds and 74 random bits.
///
/// The random bits come from [`crate::rand`] (wyrand over a randomly seeded
/// counter: unique within the process, unpredictable enough for an id),
/// not from `getrandom`, which `Uuid::now_v7` calls once per id: a system
/// call on every request.
fn new_uuid_v7(now: SystemTime) -> uuid::Uuid {
    let millis = now
        .duration_since(std::time::UNIX_EPOCH)
        .map(|d| u64::try_from(d.as_millis()).unwrap_or(u64::MAX))
        .unwrap_or(0);
    let a = crate::rand::next_u64().to_le_bytes();
    let b = crate::rand::next_u64().to_le_bytes();
    let mut random = [0u8; 10];
    random[..8].copy_from_slice(&a);
    random[8..].copy_from_slice(&b[..2]);
    uuid::Builder::from_unix_timestamp_millis(millis, &random).into_uuid()
}

/// True when no tokens are configured, or the request bears one of them.
fn authorized(tokens: &[String], headers: &http::HeaderMap) -> bool {
    if tokens.is_empty() {
        return true;
    }
    let Some(given) = headers
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::proxy_headers::bearer_token)
    else {
        return false;
    };
    tokens.iter().fold(false, |ok, t| {
        ok | constant_time_eq(t.as_bytes(), given.trim().as_bytes())
    })
}

fn constant_time_eq(a: &[u8], b: &[u8]) -> bool {
    a.len() == b.len() && a.iter().zip(b).fold(0u8, |acc, (x, y)| acc | (x ^ y)) == 0
}

/// Budget permits of one request body, with `forkd_inflight_bytes` kept in step.
struct Inflight {
    _permit: Option<OwnedSemaphorePermit>,
    bytes: i64,
    gauge: prometheus::IntGauge,
}

impl Inflight {
    fn new(permit: Option<OwnedSemaphorePermit>, bytes: u64, gauge: &prometheus::IntGauge) -> Self {
        let bytes = i64::try_from(bytes).unwrap_or(i64::MAX);
        gauge.add(bytes);
        Inflight {
            _permit: permit,
            bytes,
            gauge: gauge.clone(),
        }
    }
}

impl Drop for Inflight {
    fn drop(&mut self) {
        self.gauge.sub(self.bytes);
    }
}
