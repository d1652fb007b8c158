//! Per-target runtime: the up/down/draining state machine, the live send
//! path, and the delivery worker that replays the spool in order.
//!
//! ```text
//!   up ──transient failure──▶ down ──a delivery succeeds──▶ draining ──spool empty──▶ up
//!    ▲                         ▲                              │
//!    │                         └────────transient failure─────┘
//!    └── (a copy abandoned by secondary_wait: up ──▶ draining)
//! ```
//!
//! While a target is not `up`, new requests go to its spool without any
//! connection attempt, behind the backlog, so order holds. The state check and
//! the draining→up transition happen under one lock, and the transition also
//! requires that no reservation is outstanding, so no request can overtake a
//! record that is about to be spooled.

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, RwLock};
use std::time::{Duration, Instant, SystemTime};

use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::{RetryConfig, Target};
use crate::metrics::Metrics;
use crate::spool::{Refused, Reservation, Spool, SpoolError, Spooled};
use crate::upstream::{self, Answer, Attempt, HttpClient, Pipe};

/// Target state, as exported in `forkd_target_state`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum State {
    Up,
    Down,
    Draining,
}

impl State {
    pub fn as_str(self) -> &'static str {
        match self {
            State::Up => "up",
            State::Down => "down",
            State::Draining => "draining",
        }
    }
}

/// How a request copy enters a target, decided at admission.
#[derive(Debug)]
pub enum Admission {
    /// The target is up with no backlog: send directly.
    Live,
    /// Not up or backlogged: append within this reservation.
    Spool(Reservation),
    /// `drop_newest` and the spool is full.
    Dropped,
    /// `reject` and the spool is full: the client gets 503.
    Full,
}

/// A target's config in force and the clients made for it, swapped as one
/// by a reload: a send takes all three from one snapshot, so it never pairs
/// one config's URL, `Host` or headers (credentials) with a connection to
/// another config's host.
pub struct Conf {
    pub target: Arc<Target>,
    pub client: HttpClient,
    /// The pipelining client for live sends and replays (`http://` targets).
    pub pipe: Option<Arc<Pipe>>,
}

/// One target: config in force, client, spool, state, worker.
pub struct TargetRuntime {
    pub name: String,
    conf: RwLock<Arc<Conf>>,
    /// Pipes a reload replaced that live sends may still be using.
    replaced_pipes: Mutex<Vec<std::sync::Weak<Pipe>>>,
    retry: RwLock<RetryConfig>,
    /// This target's metric series, looked up once.
    series: Series,
    pub spool: Spool,
    state: Mutex<State>,
    metrics: Metrics,
    /// Spool counters already added to the metrics (they are cumulative in the spool).
    seen_dropped_full: AtomicU64,
    seen_dropped_corrupt: AtomicU64,
    /// The target left the config and its series were removed: nothing
    /// publishes them again (a live send still in flight may fail and
    /// change the state). Set and read under the state lock.
    forgotten: AtomicBool,
    /// A live send failed since the worker last looked: the worker backs
    /// off before it probes, and not before the end of the `Retry-After`
    /// it carried (the latest, when several failed).
    live_failure: Mutex<Option<Option<Instant>>>,
    /// When the worker's pause ends, while it backs off (for `/status`).
    next_attempt: Mutex<Option<Instant>>,
    /// Set at shutdown once its bound has passed: live sends still waiting
    /// are given up (and their copies spooled), new ones fail at once.
    abandoned: AtomicBool,
    abandon: tokio::sync::Notify,
    /// Wakes the worker on config change or shutdown.
    stop: watch::Sender<bool>,
    worker: Mutex<Option<JoinHandle<()>>>,
}

impl std::fmt::Debug for TargetRuntime {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("TargetRuntime")
            .field("name", &self.name)
            .finish()
    }
}

impl TargetRuntime {
    /// Creates the runtime for an opened spool. The state starts `up` when the
    /// spool is empty and `draining` when it holds a backlog.
    pub fn new(
        target: Target,
        retry: RetryConfig,
        spool: Spool,
        metrics: Metrics,
    ) -> Result<Arc<Self>, String> {
        let client = upstream::client(&target)?;
        let stats = spool.stats();
        let state = if stats.records == 0 {
            State::Up
        } else {
            State::Draining
        };
        metrics.add_target(&target.name);
        let series = Series::new(&metrics, &target.name);
        let (stop, _) = watch::channel(false);
        let rt = Arc::new(TargetRuntime {
            name: target.name.clone(),
            series,
            replaced_pipes: Mutex::new(Vec::new()),
            conf: RwLock::new(Arc::new(Conf {
                pipe: upstream::pipe(&target),
                client,
                target: Arc::new(target),
            })),
            retry: RwLock::new(retry),
            spool,
            state: Mutex::new(state),
            metrics,
            seen_dropped_full: AtomicU64::new(0),
            seen_dropped_corrupt: AtomicU64::new(0),
            forgotten: AtomicBool::new(false),
            live_failure: Mutex::new(None),
            next_attempt: Mutex::new(None),
            abandoned: AtomicBool::new(false),
            abandon: tokio::sync::Notify::new(),
            stop,
            worker: Mutex::new(None),
        });
        rt.publish_state(state);
        rt.refresh_metrics();
        Ok(rt)
    }

    /// Starts the delivery worker.
    pub fn start(self: &Arc<Self>) {
        let me = self.clone();
        let handle = tokio::spawn(async move { me.deliver().await });
        *self.worker.lock().unwrap_or_else(|p| p.into_inner()) = Some(handle);
    }

    /// Stops the worker (in-flight replays are abandoned; they stay spooled).
    pub async fn stop(&self) {
        let _ = self.stop.send(true);
        let handle = self.worker.lock().unwrap_or_else(|p| p.into_inner()).take();
        if let Some(h) = handle {
            let _ = h.await;
        }
    }

    /// The target config in force.
    pub fn config(&self) -> Arc<Target> {
        self.conf
            .read()
            .unwrap_or_else(|p| p.into_inner())
            .target
            .clone()
    }

    /// The target config in force with its clients.
    pub fn conf(&self) -> Arc<Conf> {
        self.conf.read().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// The config and clients a reload would put in force for `target`:
    /// new clients when the URL, `connect_timeout` or CA changed, else the
    /// ones in use. Fails (and the reload is refused) when the new client
    /// cannot be made.
    pub fn prepare(&self, target: Target) -> Result<Conf, String> {
        let old = self.conf();
        let (client, pipe) = if old.target.base != target.base
            || old.target.connect_timeout != target.connect_timeout
            || old.target.ca_certs != target.ca_certs
        {
            let client =
                upstream::client(&target).map_err(|e| format!("target {}: {e}", self.name))?;
            (client, upstream::pipe(&target))
        } else {
            (old.client.clone(), old.pipe.clone())
        };
        Ok(Conf {
            target: Arc::new(target),
            client,
            pipe,
        })
    }

    /// Applies a reloaded config made by [`TargetRuntime::prepare`]:
    /// headers and query take effect at the next send, live or replay.
    /// Spool settings other than the bound take effect at restart.
    pub fn reconfigure(&self, new: Conf, retry: RetryConfig) {
        let old_conf = self.conf();
        let old = &old_conf.target;
        let target = &*new.target;
        if let Some(old_pipe) = &old_conf.pipe
            && !new.pipe.as_ref().is_some_and(|p| Arc::ptr_eq(p, old_pipe))
        {
            // Its sends still running are given up at shutdown too.
            let mut replaced = self
                .replaced_pipes
                .lock()
                .unwrap_or_else(|p| p.into_inner());
            replaced.retain(|w| w.strong_count() > 0);
            replaced.push(Arc::downgrade(old_pipe));
        }
        let restart_only =
            |o: &crate::spool::SpoolOptions| (o.fsync, o.segment_size, o.rejected_max_size);
        if restart_only(&old.spool) != restart_only(&target.spool) {
            tracing::warn!(
                target = %self.name,
                "changed buffer fsync, segment_size or rejected_max_size take effect when forkd restarts"
            );
        }
        // `spool.when_full` is resolved for the target's role: a reload that
        // only switches the active target changes nothing the worker uses.
        let changed = {
            let mut same_role = target.clone();
            same_role.spool.when_full = old.spool.when_full;
            **old != same_role || *self.retry.read().unwrap_or_else(|p| p.into_inner()) != retry
        };
        *self.conf.write().unwrap_or_else(|p| p.into_inner()) = Arc::new(new);
        *self.retry.write().unwrap_or_else(|p| p.into_inner()) = retry;
        // Wake the worker so a backoff computed under the old settings ends
        // (a fixed URL or a rotated token is tried at once). A reload that
        // leaves the target and `[retry]` as they were keeps the pause: a
        // target that asked for a `Retry-After` is not probed early.
        if changed {
            self.stop.send_modify(|_| {});
        }
    }

    pub fn state(&self) -> State {
        *self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn set_state_locked(&self, slot: &mut State, new: State) {
        if *slot != new {
            tracing::info!(target = %self.name, from = slot.as_str(), to = new.as_str(), "target state changed");
            *slot = new;
            self.publish_state(new);
        }
    }

    fn set_state(&self, new: State) {
        let mut slot = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.set_state_locked(&mut slot, new);
    }

    /// Under the state lock (or before the runtime is shared).
    fn publish_state(&self, state: State) {
        if self.forgotten.load(Ordering::Relaxed) {
            return;
        }
        self.metrics
            .target_up
            .with_label_values(&[&self.name])
            .set(i64::from(state == State::Up));
        for s in [State::Up, State::Down, State::Draining] {
            self.metrics
                .target_state
                .with_label_values(&[&self.name, s.as_str()])
                .set(i64::from(s == state));
        }
    }

    /// Admission for one request copy of `bytes` (its record's encoded length).
    pub fn admit(&self, bytes: u64) -> Admission {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if *state == State::Up {
            return Admission::Live;
        }
        admission(self.spool.try_reserve(bytes))
    }

    /// [`admit`](Self::admit) when admitting drops no spooled record:
    /// `None` when the target's spool is full and `when_full` would drop
    /// one (see [`Spool::try_reserve_lossless`]).
    pub fn admit_lossless(&self, bytes: u64) -> Option<Admission> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if *state == State::Up {
            return Some(Admission::Live);
        }
        self.spool.try_reserve_lossless(bytes).map(admission)
    }

    /// A live send failed in a way worth retrying: the target goes `down`
    /// and the copy's room in its spool is reserved, in one step under the
    /// state lock. The worker's first probe then waits a backoff too, and
    /// at least `retry_after` (up to `max_backoff`) when the target sent
    /// one: SPEC, "Target states".
    ///
    /// One step, because the worker sets the target `up` (under the same
    /// lock) when it finds nothing spooled or reserved: between a state
    /// change and a later reservation it could find the spool empty, and
    /// the client's next request would go live ahead of the failed copy.
    /// `None` when the copy is dropped (`drop_newest`, spool full).
    pub fn fail_live(&self, bytes: u64, retry_after: Option<Duration>) -> Option<Reservation> {
        {
            let until = retry_after.and_then(deadline);
            let mut slot = self.live_failure.lock().unwrap_or_else(|p| p.into_inner());
            *slot = Some((*slot).flatten().max(until));
        }
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.set_state_locked(&mut state, State::Down);
        self.reserve_admitted(bytes)
    }

    /// A live send was abandoned at `secondary_wait`: an up target now has
    /// a backlog (`draining`), and the copy's room is reserved in the same
    /// step, as in [`fail_live`](Self::fail_live).
    pub fn abandon_to_backlog(&self, bytes: u64) -> Option<Reservation> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if *state == State::Up {
            self.set_state_locked(&mut state, State::Draining);
        }
        self.reserve_admitted(bytes)
    }

    /// Room for a copy that was admitted live: it is spooled whatever the
    /// bound says, except under `drop_newest`.
    fn reserve_admitted(&self, bytes: u64) -> Option<Reservation> {
        match self.spool.try_reserve(bytes) {
            Ok(r) => Some(r),
            Err(Refused::Dropped) => {
                // The target left `up` with nothing spooled: its idle
                // worker must look again (it backs off, finds the spool
                // empty and sets the target `up`).
                self.spool.wake_readers();
                None
            }
            Err(Refused::Rejected) => Some(self.spool.reserve_overcommit(bytes)),
        }
    }

    /// Seconds until the worker's next attempt while it backs off.
    pub fn next_attempt_in(&self) -> Option<Duration> {
        let at = (*self.next_attempt.lock().unwrap_or_else(|p| p.into_inner()))?;
        Some(at.saturating_duration_since(Instant::now()))
    }

    /// Sends once within `deadline` on the pipelining client, or the hyper
    /// client (`https://`).
    async fn send_once(
        &self,
        conf: &Conf,
        record: &crate::spool::Record,
        started: Instant,
    ) -> Attempt {
        let cfg = &conf.target;
        match &conf.pipe {
            Some(pipe) => upstream::send_pipelined(pipe, cfg, record, started, cfg.timeout).await,
            // Boxed: hyper's client and its future are large, and this path
            // (`https://`) should not size every copy's future.
            None => Box::pin(self.send_unpipelined(conf, record)).await,
        }
    }

    /// Sends once on the hyper client (`https://`), unless shutdown abandons
    /// the live sends first.
    async fn send_unpipelined(&self, conf: &Conf, record: &crate::spool::Record) -> Attempt {
        let abandoned = self.abandon.notified();
        tokio::pin!(abandoned);
        // Registered before the flag is read: an abandon in between is not
        // missed.
        abandoned.as_mut().enable();
        if self.abandoned.load(Ordering::Acquire) {
            return abandoned_attempt();
        }
        tokio::select! {
            a = upstream::send(&conf.client, &conf.target, record, conf.target.timeout) => a,
            () = abandoned => abandoned_attempt(),
        }
    }

    /// Gives up the live sends still waiting (shutdown, past its bound):
    /// each fails as a transient `io` failure, so its copy is spooled.
    pub fn abandon_live(&self) {
        self.abandoned.store(true, Ordering::Release);
        self.abandon.notify_waiters();
        if let Some(pipe) = &self.conf().pipe {
            pipe.abandon();
        }
        for pipe in self
            .replaced_pipes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .iter()
            .filter_map(std::sync::Weak::upgrade)
        {
            pipe.abandon();
        }
    }

    /// Sends a live copy once within the target's `timeout` from `started`
    /// (when the request's copies were dispatched: one clock read for all
    /// of them), recording metrics.
    pub async fn send_live(&self, record: &crate::spool::Record, started: Instant) -> Attempt {
        let attempt = self.send_once(&self.conf(), record, started).await;
        self.series
            .latency_live
            .observe(started.elapsed().as_secs_f64());
        self.count_attempt(&attempt, record);
        attempt
    }

    /// Counts an attempt's failure reason or delivered bytes.
    fn count_attempt(&self, attempt: &Attempt, record: &crate::spool::Record) {
        match attempt {
            Attempt::Delivered(_) => {
                self.series.delivered_bytes.inc_by(record.body.len() as u64);
            }
            Attempt::Rejected(_) => self.series.failure("status").inc(),
            Attempt::Transient { reason, .. } => self.series.failure(reason.as_str()).inc(),
        }
    }

    /// Counts a live copy abandoned by `secondary_wait` (a timeout).
    pub fn count_abandoned(&self) {
        self.series.failure("timeout").inc();
    }

    /// Counts a request copy's outcome.
    pub fn count_result(&self, result: &str) {
        match self.series.result(result) {
            Some(c) => c.inc(),
            None => self
                .metrics
                .target_requests
                .with_label_values(&[&self.name, result])
                .inc(),
        }
    }

    /// Keeps a record the target refused for good, and logs it. The
    /// rejected area's file and directory syncs run off the async threads:
    /// a stream of rejections must not stall every other request.
    pub async fn keep_rejected(&self, record: &crate::spool::Record, answer: &Answer) {
        tracing::warn!(
            target = %self.name, request_id = %record.request_id, status = answer.status.as_u16(),
            "target rejected the request; kept in rejected/"
        );
        let (spool, kept) = (self.spool.clone(), record.clone());
        let failed = match tokio::task::spawn_blocking(move || spool.reject(&kept)).await {
            Ok(Ok(())) => None,
            Ok(Err(e)) => Some(e.to_string()),
            Err(e) => Some(e.to_string()),
        };
        if let Some(e) = failed {
            tracing::error!(target = %self.name, request_id = %record.request_id, error = %e, "cannot keep rejected record");
        }
        self.count_result("rejected");
    }

    /// Updates the buffer gauges and counters from the spool.
    pub fn refresh_metrics(&self) {
        // Read before the state lock: `stats` may wait for the rejected
        // area's lock, which is held across its fsyncs, and admissions
        // take the state lock.
        let stats = self.spool.stats();
        let max_size = self.spool.bounds().0;
        let Some(_state) = self.publishing() else {
            return;
        };
        let name = self.name.as_str();
        let m = &self.metrics;
        m.buffer_bytes
            .with_label_values(&[name])
            .set(to_i64(stats.bytes));
        m.buffer_records
            .with_label_values(&[name])
            .set(to_i64(stats.records));
        m.buffer_max_bytes
            .with_label_values(&[name])
            .set(to_i64(max_size));
        let age = stats
            .oldest_accepted_at
            .and_then(|t| SystemTime::now().duration_since(t).ok())
            .map_or(0.0, |d| d.as_secs_f64());
        m.buffer_oldest_age.with_label_values(&[name]).set(age);
        m.buffer_rejected_records
            .with_label_values(&[name])
            .set(to_i64(stats.rejected.records));
        m.buffer_writable
            .with_label_values(&[name])
            .set(i64::from(stats.write_error.is_none()));
        m.buffer_dropped
            .with_label_values(&[name, "full"])
            .inc_by(newly_counted(&self.seen_dropped_full, stats.dropped_full));
        m.buffer_dropped
            .with_label_values(&[name, "corrupt"])
            .inc_by(newly_counted(
                &self.seen_dropped_corrupt,
                stats.dropped_corrupt,
            ));
    }

    /// Applies the target's role: the default `when_full` follows whether it
    /// is the active target (`reject`) or not (`drop_oldest`), and the bound
    /// follows the config in force.
    pub fn apply_role(&self, is_active: bool) {
        let cfg = self.config();
        let bounds = (cfg.spool.max_size, cfg.when_full_for(is_active));
        if self.spool.bounds() != bounds {
            tracing::info!(
                target = %self.name, max_size = bounds.0, when_full = %bounds.1,
                "spool bound and full policy applied"
            );
            self.spool.set_bounds(bounds.0, bounds.1);
        }
    }

    /// Marks whether the target receives new requests.
    pub fn set_selected(&self, selected: bool) {
        let Some(_state) = self.publishing() else {
            return;
        };
        self.metrics
            .target_selected
            .with_label_values(&[&self.name])
            .set(i64::from(selected));
    }

    /// The state lock, held while a target's series are written, unless
    /// the target left the config and its series are removed.
    fn publishing(&self) -> Option<std::sync::MutexGuard<'_, State>> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        (!self.forgotten.load(Ordering::Relaxed)).then_some(state)
    }

    /// Removes the target's metric series (it left the config).
    pub fn forget_metrics(&self) {
        let _state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        self.forgotten.store(true, Ordering::Relaxed);
        self.metrics.remove_target(&self.name);
    }

    /// The delivery worker: replays the spool in order, `drain_concurrency` at a time.
    async fn deliver(self: Arc<Self>) {
        let mut stop = self.stop.subscribe();
        let mut reader = Some(self.spool.reader());
        let mut failures: u32 = 0;
        // The end of the latest `Retry-After` not yet waited for.
        let mut retry_until: Option<Instant> = None;
        // The last pass paused after its read, for a live failure (below).
        let mut paused = false;
        loop {
            if *stop.borrow() {
                return;
            }
            let live = self.take_live_failure();
            if let Some(until) = live {
                failures = failures.max(1);
                retry_until = retry_until.max(until);
            }
            // Back off before reading, so that what is replayed after the
            // pause is read then (records evicted meanwhile are not sent) and
            // sent under the config in force then (a token rotated by a
            // reload during the pause is used at once). After a live failure
            // even if a replay set the target `draining` since.
            let backed_off =
                failures > 0 && (live.is_some() || (self.state() == State::Down && !paused));
            if backed_off {
                let delay = self.backoff(failures, retry_until.take().map(left_of));
                tracing::debug!(target = %self.name, delay_ms = delay.as_millis() as u64, "backing off");
                if self.pause(&mut stop, delay).await {
                    return;
                }
            }
            let cfg = self.config();
            let Some(mut r) = reader.take() else { return };
            let window = cfg.drain_concurrency.max(1);
            // While probing a failing target, read one window; once it takes
            // records, read ahead so that the window slides over many
            // records per read instead of stopping at each window's end.
            let read_ahead = if failures > 0 {
                window
            } else {
                window
                    .saturating_mul(READ_AHEAD_WINDOWS)
                    .clamp(window, MAX_READ_RECORDS)
            };
            let read = tokio::task::spawn_blocking(move || {
                let batch = r.read_batch(read_ahead, MAX_READ_BYTES);
                (r, batch)
            })
            .await;
            let batch = match read {
                Ok((r, batch)) => {
                    reader = Some(r);
                    batch
                }
                Err(e) => {
                    tracing::error!(target = %self.name, error = %e, "spool reader task failed");
                    return;
                }
            };
            let batch = match batch {
                Ok(b) => b,
                Err(e) => {
                    tracing::error!(target = %self.name, error = %e, "cannot read spool; retrying");
                    if self
                        .pause(&mut stop, self.backoff(failures.max(1), None))
                        .await
                    {
                        return;
                    }
                    continue;
                }
            };
            self.refresh_metrics();
            if batch.is_empty() {
                if !self.maybe_up() {
                    // A live failure whose copy left nothing spooled: back
                    // off for it before the target is `up` again.
                    continue;
                }
                let Some(r) = reader.as_mut() else { return };
                tokio::select! {
                    _ = r.wait() => {}
                    _ = stop.changed() => {}
                }
                continue;
            }
            paused = false;
            // A live send failed after the check at the top of the loop (its
            // copy may be in this batch): a backoff if this pass had none,
            // else what is left of its `Retry-After` (not a second backoff);
            // then read again.
            if let Some(until) = self.take_live_failure() {
                failures = failures.max(1);
                let left = until.map(left_of);
                let delay = if backed_off {
                    left.filter(|d| !d.is_zero())
                        .map(|d| self.retry_after_left(d))
                } else {
                    Some(self.backoff(failures, left))
                };
                if let Some(delay) = delay {
                    if self.pause(&mut stop, delay).await {
                        return;
                    }
                    if let Some(r) = reader.as_mut() {
                        r.rewind();
                    }
                    paused = true;
                    continue;
                }
            }
            let outcome = tokio::select! {
                o = self.replay(&cfg, &batch) => o,
                _ = wait_stop(&mut stop) => return,
            };
            if let Some(end) = outcome.ack_to {
                self.spool.ack(end);
            }
            match outcome.failure {
                None => {
                    failures = 0;
                    if self.state() == State::Down {
                        self.set_state(State::Draining);
                    }
                }
                Some(after) => {
                    failures = failures.saturating_add(1);
                    retry_until = after.and_then(deadline);
                    self.set_state(State::Down);
                    if let Some(r) = reader.as_mut() {
                        r.rewind();
                    }
                }
            }
        }
    }

    /// Sends a batch in order with at most `drain_concurrency` in flight (a
    /// sliding window) and decides, in order, how far to acknowledge. Stops
    /// at the first transient failure; sends still in flight then are
    /// abandoned (their records stay spooled and are sent again).
    async fn replay(&self, cfg: &Target, batch: &[Spooled]) -> ReplayOutcome {
        use futures::StreamExt;
        let window = cfg.drain_concurrency.max(1);
        let mut in_flight = futures::stream::FuturesOrdered::new();
        let mut sent = 0;
        let mut done = 0;
        let mut outcome = ReplayOutcome {
            ack_to: None,
            failure: None,
        };
        loop {
            while in_flight.len() < window && sent < batch.len() {
                in_flight.push_back(self.replay_one(&batch[sent]));
                sent += 1;
            }
            let Some(attempt) = in_flight.next().await else {
                break;
            };
            let s = &batch[done];
            done += 1;
            // Counted here, in order: a send that finished behind a failed
            // one is not acknowledged and goes again, and counts then.
            self.count_attempt(&attempt, &s.record);
            match attempt {
                Attempt::Delivered(_) => {
                    self.count_result("delivered");
                    outcome.ack_to = Some(s.end);
                }
                Attempt::Rejected(answer) => {
                    self.keep_rejected(&s.record, &answer).await;
                    outcome.ack_to = Some(s.end);
                }
                Attempt::Transient {
                    reason,
                    retry_after,
                    detail,
                    ..
                } => {
                    tracing::info!(
                        target = %self.name, request_id = %s.record.request_id,
                        reason = reason.as_str(), %detail, "replay failed; will retry"
                    );
                    outcome.failure = Some(retry_after);
                    break;
                }
            }
        }
        outcome
    }

    /// One replay attempt under the config in force when it is sent (a
    /// reload in the middle of a batch applies to the rest of it).
    async fn replay_one(&self, s: &Spooled) -> Attempt {
        let start = Instant::now();
        let attempt = self.send_once(&self.conf(), &s.record, start).await;
        self.series
            .latency_replay
            .observe(start.elapsed().as_secs_f64());
        attempt
    }

    /// The live failure since the last look: `Some(until)`, the end of its
    /// `Retry-After` if it carried one.
    fn take_live_failure(&self) -> Option<Option<Instant>> {
        self.live_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .take()
    }

    /// Draining → up once nothing is spooled or reserved (under the state
    /// lock). False, and the state left as it is, while a live failure is
    /// pending (its copy dropped, or its append failed): the worker backs
    /// off for it first. (`fail_live` records the failure before it takes
    /// the state lock.)
    fn maybe_up(&self) -> bool {
        let mut slot = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if *slot == State::Up {
            return true;
        }
        if self
            .live_failure
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .is_some()
        {
            return false;
        }
        // Not `stats`: admissions wait on this lock, and `stats` may wait
        // for the rejected area's fsyncs.
        if self.spool.is_idle() {
            self.set_state_locked(&mut slot, State::Up);
        }
        true
    }

    /// Capped exponential backoff with full jitter; a `Retry-After` from the
    /// target is honoured up to `max_backoff`.
    fn backoff(&self, failures: u32, retry_after: Option<Duration>) -> Duration {
        self.backoff_delay(failures, retry_after, crate::rand::unit())
    }

    /// What is `left` of a `Retry-After`, up to `max_backoff`, with no
    /// backoff of its own.
    fn retry_after_left(&self, left: Duration) -> Duration {
        self.backoff_delay(0, Some(left), 0.0)
    }

    /// [`backoff_delay`] under the `[retry]` in force.
    fn backoff_delay(&self, failures: u32, retry_after: Option<Duration>, unit: f64) -> Duration {
        let retry = self.retry.read().unwrap_or_else(|p| p.into_inner()).clone();
        backoff_delay(&retry, failures, retry_after, unit)
    }

    /// Sleeps for `delay` unless stopped; true when stopped. A config change ends the pause early.
    async fn pause(&self, stop: &mut watch::Receiver<bool>, delay: Duration) -> bool {
        *self.next_attempt.lock().unwrap_or_else(|p| p.into_inner()) =
            Instant::now().checked_add(delay);
        let stopped = tokio::select! {
            _ = tokio::time::sleep(delay) => false,
            _ = stop.changed() => *stop.borrow(),
        };
        *self.next_attempt.lock().unwrap_or_else(|p| p.into_inner()) = None;
        stopped
    }

    /// Appends an admitted copy within its reservation; maps errors for the answer.
    pub async fn append(
        &self,
        reservation: Reservation,
        record: Arc<crate::spool::Record>,
    ) -> Result<(), SpoolError> {
        let result = self.spool.append(reservation, record).await;
        match &result {
            Ok(_) => self.count_result("spooled"),
            Err(e) => tracing::error!(target = %self.name, error = %e, "cannot spool request"),
        }
        result.map(|_| ())
    }
}

/// A target's metric series, looked up once (the label lookups cost a hash
/// and a lock each, per request).
struct Series {
    delivered_bytes: prometheus::IntCounter,
    latency_live: prometheus::Histogram,
    latency_replay: prometheus::Histogram,
    /// In the order of [`crate::metrics::RESULTS`].
    results: Vec<prometheus::IntCounter>,
    /// In the order of [`crate::metrics::FAILURE_REASONS`].
    failures: Vec<prometheus::IntCounter>,
}

impl Series {
    fn new(m: &Metrics, name: &str) -> Series {
        Series {
            delivered_bytes: m.target_delivered_bytes.with_label_values(&[name]),
            latency_live: m.target_latency.with_label_values(&[name, "live"]),
            latency_replay: m.target_latency.with_label_values(&[name, "replay"]),
            results: crate::metrics::RESULTS
                .iter()
                .map(|r| m.target_requests.with_label_values(&[name, r]))
                .collect(),
            failures: crate::metrics::FAILURE_REASONS
                .iter()
                .map(|r| m.target_attempt_failures.with_label_values(&[name, r]))
                .collect(),
        }
    }

    fn result(&self, result: &str) -> Option<&prometheus::IntCounter> {
        let i = crate::metrics::RESULTS.iter().position(|r| *r == result)?;
        self.results.get(i)
    }

    fn failure(&self, reason: &str) -> &prometheus::IntCounter {
        let i = crate::metrics::FAILURE_REASONS
            .iter()
            .position(|r| *r == reason)
            .unwrap_or(0);
        &self.failures[i]
    }
}

/// Records read ahead per replay read, in windows of `drain_concurrency`.
const READ_AHEAD_WINDOWS: usize = 16;
/// Most records per replay read.
const MAX_READ_RECORDS: usize = 4096;
/// Most bytes per replay read.
const MAX_READ_BYTES: u64 = 8 << 20;

struct ReplayOutcome {
    ack_to: Option<u64>,
    /// Set when a record failed transiently (with the target's Retry-After).
    failure: Option<Option<Duration>>,
}

/// A spool's answer to a reservation, as an admission.
fn admission(reserved: Result<Reservation, Refused>) -> Admission {
    match reserved {
        Ok(r) => Admission::Spool(r),
        Err(Refused::Dropped) => Admission::Dropped,
        Err(Refused::Rejected) => Admission::Full,
    }
}

/// What a cumulative spool counter read as `now` adds to its metric, given
/// the mark of what was added already (moved up to `now`). A refresh that
/// read older stats than the last one adds nothing and leaves the mark.
fn newly_counted(seen: &AtomicU64, now: u64) -> u64 {
    now.saturating_sub(seen.fetch_max(now, Ordering::Relaxed))
}

/// The pause before attempt `failures + 1`: a uniform draw (`unit` in
/// `[0, 1)`) below `initial_backoff × 2^(failures-1)`, capped at
/// `max_backoff`; at least the target's `Retry-After`, itself capped at
/// `max_backoff`.
fn backoff_delay(
    retry: &RetryConfig,
    failures: u32,
    retry_after: Option<Duration>,
    unit: f64,
) -> Duration {
    let exp = failures.saturating_sub(1).min(31);
    let cap = retry
        .initial_backoff
        .saturating_mul(1u32 << exp)
        .min(retry.max_backoff);
    let jittered = cap.mul_f64(unit.clamp(0.0, 1.0));
    match retry_after {
        Some(after) => after.min(retry.max_backoff).max(jittered),
        None => jittered,
    }
}

/// The end of a `Retry-After` of `after` from now. One past the clock's
/// range (`Retry-After: 18446744073709551615`) ends in a year: it is still
/// honoured up to `max_backoff`, not ignored.
fn deadline(after: Duration) -> Option<Instant> {
    let now = Instant::now();
    now.checked_add(after)
        .or_else(|| now.checked_add(Duration::from_secs(365 * 86_400)))
}

/// What is left until `until`.
fn left_of(until: Instant) -> Duration {
    until.saturating_duration_since(Instant::now())
}

fn abandoned_attempt() -> Attempt {
    Attempt::Transient {
        reason: upstream::FailureReason::Io,
        retry_after: None,
        answer: None,
        detail: "abandoned at shutdown".into(),
    }
}

async fn wait_stop(stop: &mut watch::Receiver<bool>) {
    let _ = stop.wait_for(|s| *s).await;
}

fn to_i64(v: u64) -> i64 {
    i64::try_from(v).unwrap_or(i64::MAX)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::config::{Config, ConfigFormat};
    use crate::spool::{Record, Spool};

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    /// An up target named `primary` over a fresh spool; no worker runs, so
    /// the test takes the worker's steps itself.
    fn idle_target(
        dir: &std::path::Path,
    ) -> Result<Arc<TargetRuntime>, Box<dyn std::error::Error>> {
        target_with(dir, "http://127.0.0.1:9", "")
    }

    /// An up target named `primary` at `url` over a fresh spool, with
    /// `buffer`'s lines in `[buffer]`.
    fn target_with(
        dir: &std::path::Path,
        url: &str,
        buffer: &str,
    ) -> Result<Arc<TargetRuntime>, Box<dyn std::error::Error>> {
        let text = format!(
            "[targets.primary]\nurl = {url:?}\n[buffer]\ndir = {:?}\n{buffer}",
            dir.display().to_string()
        );
        let config = Config::from_text(&text, ConfigFormat::Toml, |_| None, [])?;
        let target = config.target("primary").ok_or("no target")?.clone();
        let spool = Spool::open(dir.join("primary"), target.spool.clone())?;
        let t = TargetRuntime::new(target, config.raw.retry.clone(), spool, Metrics::new()?)?;
        Ok(t)
    }

    /// A `Retry-After` past the clock's range (a -1 sent unsigned) holds
    /// the worker back for `max_backoff`, where it used to be ignored (the
    /// next probe came within `initial_backoff`).
    #[test]
    fn a_retry_after_past_the_clocks_range_holds_the_worker_back_for_max_backoff() -> TestResult {
        let dir = tempfile::tempdir()?;
        let t = idle_target(dir.path())?;
        let mut h = http::HeaderMap::new();
        h.insert(
            http::header::RETRY_AFTER,
            http::HeaderValue::from_static("18446744073709551615"),
        );
        let after = upstream::retry_after(&h, std::time::SystemTime::now()).ok_or("not parsed")?;
        let until = deadline(after).ok_or("the Retry-After was ignored")?;
        let max = t.retry.read().map_err(|e| e.to_string())?.max_backoff;
        assert_eq!(t.retry_after_left(left_of(until)), max);
        Ok(())
    }

    fn record(id: &str) -> Record {
        Record {
            accepted_at: std::time::SystemTime::UNIX_EPOCH,
            request_id: id.to_owned(),
            method: http::Method::POST,
            path_and_query: http::uri::PathAndQuery::from_static("/"),
            headers: http::HeaderMap::new(),
            body: bytes::Bytes::from_static(b"body"),
        }
    }

    /// The order race of a live failure: the worker sets a target `up` when
    /// it finds nothing spooled or reserved. A failed copy must hold its
    /// place from the moment the target leaves `up`, or the client's next
    /// request, sent live, overtakes it.
    #[test]
    fn a_copy_whose_live_send_failed_is_replayed_before_the_clients_next_request() -> TestResult {
        let dir = tempfile::tempdir()?;
        let t = idle_target(dir.path())?;
        let (failed, next) = (record("failed"), record("next"));
        let reservation = t
            .fail_live(failed.encoded_len(), None)
            .ok_or("the failed copy was dropped")?;
        // The worker finds the spool empty at this moment (the append has
        // not even started).
        t.maybe_up();
        assert_eq!(
            t.state(),
            State::Down,
            "up while a failed copy is unspooled"
        );
        t.spool.append_blocking(reservation, failed)?;
        let Admission::Spool(r) = t.admit(next.encoded_len()) else {
            panic!("the next request was not spooled behind the failed copy");
        };
        t.spool.append_blocking(r, next)?;
        let order: Vec<String> = t
            .spool
            .reader()
            .read_batch(10, 1 << 20)?
            .into_iter()
            .map(|s| s.record.request_id)
            .collect();
        assert_eq!(order, ["failed", "next"]);
        Ok(())
    }

    #[test]
    fn a_drop_counter_read_twice_or_out_of_order_is_counted_once() {
        let seen = AtomicU64::new(0);
        // Two refreshes at once: the later stats (6) are added first.
        assert_eq!(newly_counted(&seen, 6), 6);
        assert_eq!(newly_counted(&seen, 5), 0);
        assert_eq!(newly_counted(&seen, 6), 0);
        assert_eq!(newly_counted(&seen, 9), 3);
    }

    #[test]
    fn a_removed_target_whose_live_send_fails_later_does_not_bring_its_series_back() -> TestResult {
        let dir = tempfile::tempdir()?;
        let t = idle_target(dir.path())?;
        let text = |t: &TargetRuntime| -> Result<String, Box<dyn std::error::Error>> {
            Ok(String::from_utf8(t.metrics.render()?)?)
        };
        assert!(text(&t)?.contains(r#"forkd_target_state{state="up",target="primary"} 1"#));
        t.forget_metrics();
        let _reservation = t.fail_live(100, None);
        t.set_selected(true);
        t.refresh_metrics();
        let after = text(&t)?;
        assert!(
            !after.contains(r#"target="primary""#),
            "series of a removed target came back:\n{after}"
        );
        assert_eq!(t.state(), State::Down);
        Ok(())
    }

    #[test]
    fn a_copy_abandoned_at_secondary_wait_keeps_the_target_draining_until_it_is_gone() -> TestResult
    {
        let dir = tempfile::tempdir()?;
        let t = idle_target(dir.path())?;
        let abandoned = record("abandoned");
        let reservation = t
            .abandon_to_backlog(abandoned.encoded_len())
            .ok_or("the abandoned copy was dropped")?;
        t.maybe_up();
        assert_eq!(t.state(), State::Draining);
        assert!(matches!(t.admit(100), Admission::Spool(_)));
        // Its append failed (a disk error): nothing is left behind it.
        drop(reservation);
        t.maybe_up();
        assert_eq!(t.state(), State::Up);
        Ok(())
    }

    /// A live send failed and its copy could not be spooled (here: a
    /// record the spool cannot encode; in the field, a disk error). The
    /// target went `down` with nothing spooled: its worker, idle, has no
    /// append to wake on, yet must set it `up` again, or every later request
    /// is spooled (or refused) instead of sent.
    #[tokio::test]
    async fn a_target_whose_failed_copy_could_not_be_spooled_comes_back_up() -> TestResult {
        let dir = tempfile::tempdir()?;
        let (t, _sink) = with_an_idle_worker(dir.path(), "").await?;
        let unencodable = Record {
            request_id: "x".repeat(70_000),
            ..record("")
        };
        let reservation = t.fail_live(100, None).ok_or("dropped")?;
        assert_eq!(t.state(), State::Down);
        assert!(t.append(reservation, Arc::new(unencodable)).await.is_err());
        wait_until_up(&t).await?;
        t.stop().await;
        Ok(())
    }

    /// The same when the copy is dropped (`drop_newest`, no room for it):
    /// the target left `up` and nothing was spooled or reserved.
    #[tokio::test]
    async fn a_target_whose_failed_copy_was_dropped_comes_back_up() -> TestResult {
        let dir = tempfile::tempdir()?;
        let buffer = "max_size = \"1MiB\"\nwhen_full = \"drop_newest\"\n";
        let (t, _sink) = with_an_idle_worker(dir.path(), buffer).await?;
        assert!(t.fail_live(2 << 20, None).is_none(), "not dropped");
        assert_eq!(t.state(), State::Down);
        wait_until_up(&t).await?;
        t.stop().await;
        Ok(())
    }

    /// A target at a sink, its worker started and idle: a first failed
    /// copy was spooled and replayed, and once the target is up again its
    /// worker has found the spool empty and waits.
    async fn with_an_idle_worker(
        dir: &std::path::Path,
        buffer: &str,
    ) -> Result<(Arc<TargetRuntime>, crate::sink::Sink), Box<dyn std::error::Error>> {
        let sink = crate::sink::SinkBuilder::new().start().await?;
        let t = target_with(dir, &sink.url(), buffer)?;
        t.start();
        let first = record("first");
        let reservation = t.fail_live(first.encoded_len(), None).ok_or("dropped")?;
        t.append(reservation, Arc::new(first)).await?;
        wait_until_up(&t).await?;
        assert_eq!(sink.delivered_count(), 1);
        Ok((t, sink))
    }

    async fn wait_until_up(t: &TargetRuntime) -> Result<(), String> {
        let deadline = Instant::now() + Duration::from_secs(10);
        while t.state() != State::Up {
            if Instant::now() > deadline {
                return Err(format!("still {} with an empty spool", t.state().as_str()));
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
        Ok(())
    }

    /// A reload ends the worker's pause only when the target's settings or
    /// `[retry]` changed: one that leaves them, or only switches which
    /// target is active (which resolves `when_full` for the other role),
    /// keeps a target's `Retry-After`.
    #[test]
    fn only_a_reload_that_changes_the_target_or_retry_ends_the_workers_pause() -> TestResult {
        let dir = tempfile::tempdir()?;
        let t = idle_target(dir.path())?;
        let load = |active: &str, timeout: &str| -> Result<Config, Box<dyn std::error::Error>> {
            let text = format!(
                "[routing]\nactive = {active:?}\n\
                 [targets.primary]\nurl = \"http://127.0.0.1:9\"\ntimeout = {timeout:?}\n\
                 [targets.backup]\nurl = \"http://127.0.0.1:9\"\n\
                 [buffer]\ndir = {:?}\n",
                dir.path().display().to_string()
            );
            Ok(Config::from_text(&text, ConfigFormat::Toml, |_| None, [])?)
        };
        let primary = |c: &Config| c.target("primary").cloned().ok_or("no primary");
        let reconfigure = |c: &Config, retry: RetryConfig| -> TestResult {
            t.reconfigure(t.prepare(primary(c)?)?, retry);
            Ok(())
        };
        let (as_active, as_passive) = (load("primary", "5s")?, load("backup", "5s")?);
        assert_ne!(
            primary(&as_active)?.spool.when_full,
            primary(&as_passive)?.spool.when_full
        );
        reconfigure(&as_active, as_active.raw.retry.clone())?;
        let mut woken = t.stop.subscribe();
        reconfigure(&as_active, as_active.raw.retry.clone())?;
        reconfigure(&as_passive, as_passive.raw.retry.clone())?;
        assert!(
            !woken.has_changed()?,
            "a reload that changed nothing ended the pause"
        );
        let slower = load("backup", "7s")?;
        reconfigure(&slower, slower.raw.retry.clone())?;
        assert!(woken.has_changed()?, "a changed target kept its pause");
        let mut retry = slower.raw.retry.clone();
        retry.max_backoff += Duration::from_secs(1);
        woken.borrow_and_update();
        reconfigure(&slower, retry)?;
        assert!(woken.has_changed()?, "a changed [retry] kept the pause");
        Ok(())
    }

    fn retry(initial_ms: u64, max_ms: u64) -> RetryConfig {
        RetryConfig {
            initial_backoff: Duration::from_millis(initial_ms),
            max_backoff: Duration::from_millis(max_ms),
        }
    }

    #[test]
    fn the_backoff_ceiling_doubles_with_each_failure_up_to_max_backoff() {
        let r = retry(100, 30_000);
        let ceiling = |failures| backoff_delay(&r, failures, None, 1.0).as_millis();
        let got: Vec<u128> = (1..=11).map(ceiling).collect();
        assert_eq!(
            got,
            [
                100, 200, 400, 800, 1600, 3200, 6400, 12_800, 25_600, 30_000, 30_000
            ]
        );
        assert_eq!(ceiling(u32::MAX), 30_000, "no overflow after many failures");
    }

    #[test]
    fn the_backoff_is_a_uniform_draw_below_its_ceiling() {
        let r = retry(100, 30_000);
        assert_eq!(backoff_delay(&r, 4, None, 0.0), Duration::ZERO);
        assert_eq!(backoff_delay(&r, 4, None, 0.5), Duration::from_millis(400));
        let draws: Vec<Duration> = (0..2000)
            .map(|_| backoff_delay(&r, 4, None, crate::rand::unit()))
            .collect();
        let ceiling = Duration::from_millis(800);
        assert!(draws.iter().all(|d| *d < ceiling));
        assert!(draws.iter().any(|d| *d < ceiling / 4), "no short pauses");
        assert!(draws.iter().any(|d| *d > ceiling * 3 / 4), "no long pauses");
    }

    #[test]
    fn a_retry_after_is_honoured_up_to_max_backoff() {
        let r = retry(100, 60_000);
        let at_least =
            |after_s, unit| backoff_delay(&r, 1, Some(Duration::from_secs(after_s)), unit);
        assert_eq!(at_least(30, 0.0), Duration::from_secs(30));
        assert_eq!(at_least(30, 1.0), Duration::from_secs(30));
        assert_eq!(at_least(600, 0.0), Duration::from_secs(60), "capped");
        // A long own backoff is not shortened by a short Retry-After.
        let late = backoff_delay(&r, 12, Some(Duration::from_secs(1)), 1.0);
        assert_eq!(late, Duration::from_secs(60));
    }
}
