//! Wiring: open the spools, start the targets, the listeners and the signal
//! handlers; reload, switch and shut down.
//!
//! Everything that can fail at start (config, spool locks, binding) fails
//! before any request is served, with one line naming the cause.

use std::collections::BTreeMap;
use std::net::SocketAddr;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::config::Config;
use crate::fork::{ActiveSource, Fork, Routing};
use crate::metrics::Metrics;
use crate::server::{self, Limits};
use crate::spool::Spool;
use crate::target::TargetRuntime;

/// File under `buffer.dir` that keeps an admin switch across reloads and restarts.
pub const ROUTING_STATE_FILE: &str = "routing.state";

/// At shutdown, how long requests whose live sends were given up get to
/// spool their copies before the spools close.
const SPOOL_AT_SHUTDOWN: Duration = Duration::from_secs(10);
/// How long a reload that adds a target back waits for the spool of its
/// earlier removal to close before it is refused.
const READD_WAIT: Duration = Duration::from_secs(1);

/// Errors that stop forkd from starting or running.
#[derive(Debug, thiserror::Error)]
pub enum AppError {
    #[error("{0}")]
    Config(#[from] crate::config::ConfigError),
    #[error("target {target}: {source}")]
    Spool {
        target: String,
        #[source]
        source: crate::spool::SpoolError,
    },
    #[error("cannot listen on {addr} ({what}): {source}")]
    Bind {
        what: &'static str,
        addr: SocketAddr,
        #[source]
        source: std::io::Error,
    },
    #[error("{0}")]
    Other(String),
}

/// The saved admin switch.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct SavedRouting {
    pub active: String,
}

fn load_saved(dir: &Path) -> Option<SavedRouting> {
    let path = dir.join(ROUTING_STATE_FILE);
    match std::fs::read(&path) {
        Ok(bytes) => match serde_json::from_slice(&bytes) {
            Ok(s) => Some(s),
            Err(e) => {
                tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable routing state");
                None
            }
        },
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(e) => {
            tracing::warn!(path = %path.display(), error = %e, "ignoring unreadable routing state");
            None
        }
    }
}

/// Control plane shared by the admin endpoints and the signal handlers.
pub struct Control {
    pub fork: Arc<Fork>,
    pub metrics: Metrics,
    config_path: Option<PathBuf>,
    buffer_dir: PathBuf,
    /// Every configured target's runtime by name.
    runtimes: Mutex<BTreeMap<String, Arc<TargetRuntime>>>,
    /// Targets removed by a reload whose spools stay open until the
    /// requests that still hold them are done (see [`retire`]).
    retiring: Arc<Mutex<Vec<Arc<TargetRuntime>>>>,
    /// Serializes reloads and switches.
    change: tokio::sync::Mutex<()>,
    ready: AtomicBool,
    pub admin_token: Mutex<Option<String>>,
    /// The ingest listener's TLS config, re-read on reload (certificate rotation).
    tls: Option<server::TlsSource>,
}

impl std::fmt::Debug for Control {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Control").finish_non_exhaustive()
    }
}

/// Opens one target's spool off the async threads.
async fn open_target(
    config: &Config,
    target: &crate::config::Target,
    metrics: &Metrics,
) -> Result<Arc<TargetRuntime>, AppError> {
    let dir = config.raw.buffer.dir.join(&target.name);
    let opts = target.spool.clone();
    let name = target.name.clone();
    let spool = tokio::task::spawn_blocking(move || Spool::open(&dir, opts))
        .await
        .map_err(|e| AppError::Other(format!("spool open task failed: {e}")))?
        .map_err(|source| AppError::Spool {
            target: name,
            source,
        })?;
    TargetRuntime::new(
        target.clone(),
        config.raw.retry.clone(),
        spool,
        metrics.clone(),
    )
    .map_err(|e| AppError::Other(format!("target {}: {e}", target.name)))
}

impl Control {
    fn routing_for(
        &self,
        config: Arc<Config>,
        runtimes: &BTreeMap<String, Arc<TargetRuntime>>,
    ) -> Routing {
        let (active, source) = match load_saved(&self.buffer_dir) {
            Some(saved) if config.target(&saved.active).is_some() => {
                (saved.active, ActiveSource::Admin)
            }
            Some(saved) => {
                tracing::warn!(target = %saved.active, "saved active target is not configured; using routing.active");
                (config.raw.routing.active.clone(), ActiveSource::Config)
            }
            None => (config.raw.routing.active.clone(), ActiveSource::Config),
        };
        let targets = config
            .targets
            .iter()
            .filter_map(|t| runtimes.get(&t.name).cloned())
            .collect();
        Routing {
            config,
            active,
            active_source: source,
            targets,
        }
    }

    fn retiring(&self) -> Vec<Arc<TargetRuntime>> {
        self.retiring
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    fn runtimes(&self) -> BTreeMap<String, Arc<TargetRuntime>> {
        self.runtimes
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .clone()
    }

    /// Re-reads the config file and swaps it in; on any problem the old config keeps running.
    pub async fn reload(&self) -> Result<(), String> {
        let _guard = self.change.lock().await;
        let result = self.reload_locked().await;
        match &result {
            Ok(()) => {
                self.metrics
                    .config_reloads
                    .with_label_values(&["success"])
                    .inc();
                self.metrics.config_last_reload_successful.set(1);
                tracing::info!("config reloaded");
            }
            Err(e) => {
                self.metrics
                    .config_reloads
                    .with_label_values(&["failure"])
                    .inc();
                self.metrics.config_last_reload_successful.set(0);
                for line in e.lines() {
                    tracing::error!(problem = %line, "config reload refused; the previous config keeps running");
                }
            }
        }
        result
    }

    async fn reload_locked(&self) -> Result<(), String> {
        let Some(path) = &self.config_path else {
            return Err("no config file to reload".into());
        };
        let config = Config::load(path).map_err(|e| e.to_string())?;
        let old = self.fork.routing();
        // How long a request started under the old config may still run
        // (its timeouts, read before this reload changes any).
        let longest_request = {
            let raw = &old.config.raw;
            let longest_send = old.targets.iter().map(|t| t.config().timeout).max();
            raw.server
                .request_timeout
                .saturating_add(longest_send.unwrap_or_default())
                .saturating_add(raw.routing.secondary_wait)
        };
        if config.raw.buffer.dir != old.config.raw.buffer.dir {
            return Err("buffer.dir: cannot change while running; restart forkd".into());
        }
        // `max_inflight_bytes` takes effect at restart, `max_body_size` at
        // once: a body that the budget in force can never hold would wait
        // for it until `request_timeout`, holding all of it meanwhile.
        let budget = self.fork.budget_bytes();
        if config.raw.server.max_body_size.as_u64() > budget {
            return Err(format!(
                "server.max_body_size ({}) is larger than the server.max_inflight_bytes in force ({}); \
                 raise max_inflight_bytes and restart forkd first",
                config.raw.server.max_body_size,
                bytesize::ByteSize::b(budget)
            ));
        }
        for w in &config.warnings {
            tracing::warn!(warning = %w, "config");
        }
        for (key, changed) in [
            ("server.listen", config.listen != old.config.listen),
            (
                "admin.listen",
                config.admin_listen != old.config.admin_listen,
            ),
            (
                "server.max_inflight_bytes",
                config.raw.server.max_inflight_bytes != old.config.raw.server.max_inflight_bytes,
            ),
            ("log", config.raw.log != old.config.raw.log),
        ] {
            if changed {
                tracing::warn!(key, "changed; takes effect when forkd restarts");
            }
        }
        // Everything that can fail comes first: the new TLS config and the
        // new targets' spools. Only then is anything changed, so a refused
        // reload leaves every running target as it was.
        let new_tls = match (&self.tls, &config.raw.server.tls) {
            (Some(_), Some(t)) => Some(crate::tls::server_config(t)?),
            (None, None) => None,
            _ => {
                tracing::warn!(
                    key = "server.tls",
                    "turning TLS on or off takes effect when forkd restarts"
                );
                None
            }
        };
        // A target added back soon after its removal: its old spool closes
        // once the requests that held it are done, which is usually at once.
        let still_open = || {
            self.retiring()
                .iter()
                .find(|rt| config.target(&rt.name).is_some())
                .map(|rt| rt.name.clone())
        };
        let waited = tokio::time::Instant::now();
        while let Some(name) = still_open() {
            if waited.elapsed() >= READD_WAIT {
                return Err(format!(
                    "target {name}: removed by an earlier reload, its spool is still open for \
                     requests in flight; reload again once they are done"
                ));
            }
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
        let mut runtimes = self.runtimes();
        let mut opened: Vec<Arc<TargetRuntime>> = Vec::new();
        for t in config
            .targets
            .iter()
            .filter(|t| !runtimes.contains_key(&t.name))
        {
            match open_target(&config, t, &self.metrics).await {
                Ok(rt) => opened.push(rt),
                Err(e) => {
                    close_unused(opened).await;
                    return Err(e.to_string());
                }
            }
        }
        let mut prepared = Vec::new();
        for t in &config.targets {
            if let Some(rt) = runtimes.get(&t.name) {
                match rt.prepare(t.clone()) {
                    Ok(conf) => prepared.push((rt.clone(), conf)),
                    Err(e) => {
                        close_unused(opened).await;
                        return Err(e);
                    }
                }
            }
        }
        if let (Some(source), Some(tls)) = (&self.tls, new_tls) {
            source.set(tls);
        }
        for (rt, conf) in prepared {
            rt.reconfigure(conf, config.raw.retry.clone());
        }
        for rt in opened {
            rt.start();
            runtimes.insert(rt.name.clone(), rt);
        }
        let removed: Vec<String> = runtimes
            .keys()
            .filter(|n| config.target(n).is_none())
            .cloned()
            .collect();
        let config = Arc::new(config);
        let routing = Arc::new(self.routing_for(config.clone(), &runtimes));
        *self.admin_token.lock().unwrap_or_else(|p| p.into_inner()) =
            config.raw.admin.token.clone();
        self.fork.set_routing(routing);
        drop(old);
        let removed: Vec<Arc<TargetRuntime>> = removed
            .iter()
            .filter_map(|name| runtimes.remove(name))
            .collect();
        *self.runtimes.lock().unwrap_or_else(|p| p.into_inner()) = runtimes;
        if removed.is_empty() {
            return Ok(());
        }
        // Requests in flight finish under the routing they started with:
        // a removed target's spool stays open for their copies, and is
        // closed off the reload's path (a reload, a switch or a shutdown
        // does not wait for it). Listed before anything else, so a
        // shutdown always finds it in one list or the other.
        let ids: Vec<usize> = removed.iter().map(runtime_id).collect();
        self.retiring
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .extend(removed.iter().cloned());
        for rt in removed {
            tracing::warn!(
                target = %rt.name,
                "target removed from the config; its spool stays on disk (see forkd spool inspect)"
            );
            rt.stop().await;
            rt.forget_metrics();
        }
        tokio::spawn(retire(self.retiring.clone(), ids, longest_request));
        Ok(())
    }

    /// Switches the active target now and saves the switch.
    pub async fn switch(&self, target: &str) -> Result<(), SwitchError> {
        let _guard = self.change.lock().await;
        let routing = self.fork.routing();
        if routing.target(target).is_none() {
            return Err(SwitchError::UnknownTarget(target.to_owned()));
        }
        let state = serde_json::to_vec(&SavedRouting {
            active: target.to_owned(),
        })
        .map_err(|e| SwitchError::Save(e.to_string()))?;
        write_state(&self.buffer_dir, &state).map_err(|e| SwitchError::Save(e.to_string()))?;
        let runtimes = self.runtimes();
        self.fork.set_routing(Arc::new(
            self.routing_for(routing.config.clone(), &runtimes),
        ));
        tracing::warn!(target, "active target switched by the admin API");
        Ok(())
    }

    /// Drops the saved switch: `routing.active` from the config rules again.
    pub async fn clear_switch(&self) -> Result<(), SwitchError> {
        let _guard = self.change.lock().await;
        let path = self.buffer_dir.join(ROUTING_STATE_FILE);
        let removed = match std::fs::remove_file(&path) {
            Ok(()) => true,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => false,
            Err(e) => return Err(SwitchError::Save(e.to_string())),
        };
        // The file is gone: the routing follows it whatever comes next.
        let routing = self.fork.routing();
        let runtimes = self.runtimes();
        self.fork.set_routing(Arc::new(
            self.routing_for(routing.config.clone(), &runtimes),
        ));
        tracing::warn!("admin switch cleared; routing.active applies");
        if removed {
            // The removal made durable: after a power loss the switch must
            // not come back.
            std::fs::File::open(&self.buffer_dir)
                .and_then(|d| d.sync_all())
                .map_err(|e| {
                    SwitchError::Save(format!(
                        "switch cleared, but syncing the directory failed: {e}"
                    ))
                })?;
        }
        Ok(())
    }

    /// `/readyz`: listeners bound, config loaded, every spool writable.
    pub fn ready(&self) -> bool {
        self.ready.load(Ordering::Acquire)
            && self
                .fork
                .routing()
                .targets
                .iter()
                .all(|t| t.spool.stats().write_error.is_none())
    }

    /// Refreshes the spool gauges (at scrape time).
    pub fn refresh_metrics(&self) {
        for t in self.runtimes().values() {
            t.refresh_metrics();
        }
    }

    /// `/status` JSON.
    pub fn status(&self) -> serde_json::Value {
        let routing = self.fork.routing();
        let now = std::time::SystemTime::now();
        let mut targets = serde_json::Map::new();
        for t in &routing.targets {
            let stats = t.spool.stats();
            let age = stats
                .oldest_accepted_at
                .and_then(|a| now.duration_since(a).ok())
                .map_or(0, |d| d.as_secs());
            targets.insert(
                t.name.clone(),
                serde_json::json!({
                    "state": t.state().as_str(),
                    "selected": routing.is_selected(&t.name),
                    "buffer_bytes": stats.bytes,
                    "buffer_records": stats.records,
                    "oldest_record_age_seconds": age,
                    "url": t.config().display_url(),
                    "next_attempt_in_seconds": t.next_attempt_in().map(|d| d.as_secs()),
                }),
            );
        }
        serde_json::json!({
            "mode": routing.config.raw.routing.mode.to_string(),
            "active": routing.active,
            "active_source": routing.active_source.as_str(),
            "targets": targets,
        })
    }

    /// Shutdown, once the listener's bound has passed: requests still
    /// waiting for a target give up their live sends and spool those copies
    /// (SPEC.md "Shutdown"). Waits for them up to [`SPOOL_AT_SHUTDOWN`].
    async fn finish_in_flight(&self) {
        if self.fork.in_flight() == 0 {
            return;
        }
        tracing::warn!(
            requests = self.fork.in_flight(),
            "shutdown_timeout passed with requests in flight; spooling their undelivered copies"
        );
        for rt in self.runtimes().values().chain(self.retiring().iter()) {
            rt.abandon_live();
        }
        let until = tokio::time::Instant::now() + SPOOL_AT_SHUTDOWN;
        while self.fork.in_flight() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        // Let the connections write the answers just made (graceful
        // shutdown closes each after its answer).
        let until = tokio::time::Instant::now() + Duration::from_secs(1);
        while self.metrics.connections.get() > 0 && tokio::time::Instant::now() < until {
            tokio::time::sleep(Duration::from_millis(10)).await;
        }
        if self.fork.in_flight() > 0 {
            tracing::error!(
                requests = self.fork.in_flight(),
                "requests still in flight after spooling for {}s; closing anyway",
                SPOOL_AT_SHUTDOWN.as_secs()
            );
        }
    }

    async fn close_all(&self) {
        let mut runtimes: Vec<Arc<TargetRuntime>> =
            std::mem::take(&mut *self.runtimes.lock().unwrap_or_else(|p| p.into_inner()))
                .into_values()
                .collect();
        // Removed targets whose spools are still open: taken from their
        // `retire` task, which ends when it finds them gone (a spool it is
        // closing at this moment is closed twice, which is harmless).
        runtimes.extend(std::mem::take(
            &mut *self.retiring.lock().unwrap_or_else(|p| p.into_inner()),
        ));
        for rt in &runtimes {
            rt.stop().await;
        }
        let spools: Vec<Spool> = runtimes.iter().map(|rt| rt.spool.clone()).collect();
        drop(runtimes);
        close_spools(spools).await;
    }
}

/// Why a switch failed.
#[derive(Debug, thiserror::Error)]
pub enum SwitchError {
    #[error("no target named {0:?}")]
    UnknownTarget(String),
    #[error("cannot save the switch: {0}")]
    Save(String),
}

/// Closes the runtimes a refused reload opened (nothing uses them yet).
async fn close_unused(opened: Vec<Arc<TargetRuntime>>) {
    let spools: Vec<Spool> = opened.iter().map(|rt| rt.spool.clone()).collect();
    for rt in opened {
        rt.forget_metrics();
    }
    close_spools(spools).await;
}

/// Closes `spools` (a final sync each, their locks released) off the async
/// threads.
async fn close_spools(spools: Vec<Spool>) {
    let _ = tokio::task::spawn_blocking(move || spools.into_iter().for_each(Spool::close)).await;
}

/// A runtime's identity (its address), for [`retire`].
fn runtime_id(rt: &Arc<TargetRuntime>) -> usize {
    Arc::as_ptr(rt) as usize
}

/// Closes the spools of the removed runtimes `ids` (held in `retiring`)
/// once nothing else holds them (every request and copy that took one has
/// finished), or once `bound` has passed. A runtime leaves `retiring` only
/// after its spool is closed (its directory lock released), so a reload
/// that adds the target back and waits for it to leave can open it.
async fn retire(
    retiring: Arc<Mutex<Vec<Arc<TargetRuntime>>>>,
    mut ids: Vec<usize>,
    bound: Duration,
) {
    let start = tokio::time::Instant::now();
    let mut tick = tokio::time::interval(Duration::from_millis(20));
    loop {
        tick.tick().await;
        let over = start.elapsed() >= bound;
        let (done, spools, left): (Vec<usize>, Vec<Spool>, bool) = {
            let list = retiring.lock().unwrap_or_else(|p| p.into_inner());
            let mine = || list.iter().filter(|rt| ids.contains(&runtime_id(rt)));
            let (done, spools) = mine()
                .filter(|rt| over || Arc::strong_count(rt) == 1)
                .map(|rt| (runtime_id(rt), rt.spool.clone()))
                .unzip();
            (done, spools, mine().next().is_some())
        };
        if !left {
            // Shutdown took them (and closes them).
            return;
        }
        if done.is_empty() {
            continue;
        }
        close_spools(spools).await;
        retiring
            .lock()
            .unwrap_or_else(|p| p.into_inner())
            .retain(|rt| !done.contains(&runtime_id(rt)));
        // Forgotten once closed: a later runtime at the same address is
        // not this task's.
        ids.retain(|id| !done.contains(id));
    }
}

fn write_state(dir: &Path, bytes: &[u8]) -> std::io::Result<()> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let tmp = dir.join(format!("{ROUTING_STATE_FILE}.tmp"));
    let mut f = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(&tmp)?;
    f.write_all(bytes)?;
    f.sync_data()?;
    drop(f);
    std::fs::rename(&tmp, dir.join(ROUTING_STATE_FILE))?;
    std::fs::File::open(dir)?.sync_all()
}

/// A running forkd: addresses and a way to stop it.
pub struct Running {
    pub addr: SocketAddr,
    pub admin_addr: SocketAddr,
    pub control: Arc<Control>,
    stop: watch::Sender<bool>,
    task: JoinHandle<()>,
}

impl std::fmt::Debug for Running {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Running").field("addr", &self.addr).finish()
    }
}

impl Running {
    /// Stops accepting, lets in-flight requests finish, stops workers, syncs spools.
    pub async fn shutdown(self) {
        let _ = self.stop.send(true);
        let _ = self.task.await;
    }

    /// Resolves when the app has stopped.
    pub fn stopper(&self) -> watch::Sender<bool> {
        self.stop.clone()
    }
}

/// Starts forkd on `config`; `config_path` enables reload. Binds the
/// configured addresses (port 0 picks a free port).
pub async fn start(config: Config, config_path: Option<PathBuf>) -> Result<Running, AppError> {
    let listener = TcpListener::bind(config.listen)
        .await
        .map_err(|source| AppError::Bind {
            what: "server.listen",
            addr: config.listen,
            source,
        })?;
    let admin_listener = TcpListener::bind(config.admin_listen)
        .await
        .map_err(|source| AppError::Bind {
            what: "admin.listen",
            addr: config.admin_listen,
            source,
        })?;
    start_on(config, config_path, listener, admin_listener).await
}

/// [`start`] on listeners the caller bound.
pub async fn start_on(
    config: Config,
    config_path: Option<PathBuf>,
    listener: TcpListener,
    admin_listener: TcpListener,
) -> Result<Running, AppError> {
    let metrics = Metrics::new().map_err(|e| AppError::Other(format!("metrics: {e}")))?;
    let buffer_dir = config.raw.buffer.dir.clone();
    crate::spool::create_dir_private(&buffer_dir).map_err(|source| AppError::Spool {
        target: "(buffer.dir)".into(),
        source,
    })?;
    let mut runtimes = BTreeMap::new();
    for t in &config.targets {
        match open_target(&config, t, &metrics).await {
            Ok(rt) => {
                runtimes.insert(t.name.clone(), rt);
            }
            Err(e) => {
                let spools: Vec<Spool> = runtimes
                    .values()
                    .map(|rt: &Arc<TargetRuntime>| rt.spool.clone())
                    .collect();
                drop(runtimes);
                close_spools(spools).await;
                return Err(e);
            }
        }
    }
    for w in &config.warnings {
        tracing::warn!(warning = %w, "config");
    }
    let tls = match &config.raw.server.tls {
        Some(t) => Some(server::TlsSource::new(
            crate::tls::server_config(t)
                .map_err(|e| AppError::Other(format!("server.tls: {e}")))?,
        )),
        None => None,
    };
    let addr = listener
        .local_addr()
        .map_err(|e| AppError::Other(e.to_string()))?;
    let admin_addr = admin_listener
        .local_addr()
        .map_err(|e| AppError::Other(e.to_string()))?;
    let config = Arc::new(config);
    let limits = Limits {
        max_connections: config.raw.server.max_connections,
        header_read_timeout: config.raw.server.header_read_timeout,
        shutdown_timeout: config.raw.server.shutdown_timeout,
        ..Limits::default()
    };
    let placeholder = Arc::new(Routing {
        config: config.clone(),
        active: config.raw.routing.active.clone(),
        active_source: ActiveSource::Config,
        targets: Vec::new(),
    });
    let fork = Arc::new(Fork::new(
        placeholder,
        config.raw.server.max_inflight_bytes.as_u64(),
        metrics.clone(),
    ));
    let control = Arc::new(Control {
        fork: fork.clone(),
        metrics: metrics.clone(),
        config_path,
        buffer_dir,
        runtimes: Mutex::new(BTreeMap::new()),
        retiring: Arc::default(),
        change: tokio::sync::Mutex::new(()),
        ready: AtomicBool::new(false),
        admin_token: Mutex::new(config.raw.admin.token.clone()),
        tls: tls.clone(),
    });
    let routing = control.routing_for(config.clone(), &runtimes);
    if routing.active_source == ActiveSource::Admin {
        tracing::warn!(active = %routing.active, "active target set by a saved admin switch");
    }
    fork.set_routing(Arc::new(routing));
    for rt in runtimes.values() {
        rt.start();
    }
    *control.runtimes.lock().unwrap_or_else(|p| p.into_inner()) = runtimes;

    let (stop, stop_rx) = watch::channel(false);
    let main = {
        let fork = fork.clone();
        let stop_rx = stop_rx.clone();
        let gauge = metrics.connections.clone();
        tokio::spawn(server::serve(
            listener,
            limits.clone(),
            tls.clone(),
            move |req, from: server::RequestInfo| {
                fork.clone()
                    .handle(req, Some(from.remote.ip()), from.started)
            },
            Some(gauge),
            wait_true(stop_rx),
        ))
    };
    let admin = {
        let control = control.clone();
        let admin_limits = Limits {
            max_connections: 256,
            ..limits.clone()
        };
        tokio::spawn(server::serve(
            admin_listener,
            admin_limits,
            None,
            move |req, _| {
                let control = control.clone();
                async move { crate::admin::handle(&control, req).await }
            },
            None,
            wait_true(stop_rx),
        ))
    };
    control.ready.store(true, Ordering::Release);
    tracing::info!(
        %addr, %admin_addr, mode = %config.raw.routing.mode, active = %fork.routing().active,
        targets = config.targets.len(), "forkd started"
    );
    let task = {
        let control = control.clone();
        tokio::spawn(async move {
            let _ = main.await;
            control.ready.store(false, Ordering::Release);
            control.fork.close();
            control.finish_in_flight().await;
            let _ = admin.await;
            control.close_all().await;
            tracing::info!("forkd stopped");
        })
    };
    Ok(Running {
        addr,
        admin_addr,
        control,
        stop,
        task,
    })
}

async fn wait_true(mut rx: watch::Receiver<bool>) {
    let _ = rx.wait_for(|v| *v).await;
}

/// `forkd run`: start, then serve until SIGTERM/SIGINT; SIGHUP reloads.
pub async fn run(config_path: PathBuf) -> Result<(), AppError> {
    use tokio::signal::unix::{SignalKind, signal};
    let config = Config::load(&config_path)?;
    let mut hup = signal(SignalKind::hangup())
        .map_err(|e| AppError::Other(format!("signal handler: {e}")))?;
    let mut term = signal(SignalKind::terminate())
        .map_err(|e| AppError::Other(format!("signal handler: {e}")))?;
    let mut int = signal(SignalKind::interrupt())
        .map_err(|e| AppError::Other(format!("signal handler: {e}")))?;
    let running = start(config, Some(config_path)).await?;
    loop {
        tokio::select! {
            _ = hup.recv() => {
                tracing::info!("SIGHUP: reloading config");
                let _ = running.control.reload().await;
            }
            _ = term.recv() => { tracing::info!("SIGTERM: shutting down"); break; }
            _ = int.recv() => { tracing::info!("SIGINT: shutting down"); break; }
        }
    }
    running.shutdown().await;
    Ok(())
}
