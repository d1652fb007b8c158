#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]
//! Process-level harness of the fault-injection and hostile-client suites
//! (`tests/faults.rs`, `tests/hostile.rs`): the release binary, a running
//! `forkd run` child that can be SIGKILLed and restarted, a blocking
//! HTTP/1.1 client, sequence-numbered load and the delivery checks.
//!
//! Nothing here sleeps to synchronise: every wait polls a condition with a
//! deadline. Sleeps that remain are the fault schedule (when to kill, when to
//! flap) or a client's pause before it retries.

use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Stdio};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Mutex, OnceLock, RwLock};
use std::thread::JoinHandle;
use std::time::{Duration, Instant};

use forkd::sink::Received;

use crate::common::Metrics;

/// Upper bound for anything a test waits for; reached only when something is wrong.
pub const DEADLINE: Duration = Duration::from_secs(90);
/// Poll period of every wait.
pub const TICK: Duration = Duration::from_millis(20);

// ---------------------------------------------------------------- the binary

static RELEASE_BIN: OnceLock<PathBuf> = OnceLock::new();

/// The release build of `forkd`, built once per test process.
///
/// `cargo build --release --locked --bin forkd` runs from here (a no-op when
/// `.ci/run` built it already) and its JSON messages name the executable, so
/// the test runs exactly what `cargo build --release` produced, wherever the
/// target directory is. `FORKD_TEST_BIN=/path/to/forkd` skips the build.
pub fn release_bin() -> &'static Path {
    RELEASE_BIN.get_or_init(|| {
        if let Some(p) = std::env::var_os("FORKD_TEST_BIN") {
            return PathBuf::from(p);
        }
        let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
        let started = Instant::now();
        let out = Command::new(cargo)
            .current_dir(env!("CARGO_MANIFEST_DIR"))
            .args([
                "build",
                "--release",
                "--locked",
                "--bin",
                "forkd",
                "--message-format=json-render-diagnostics",
            ])
            .stdin(Stdio::null())
            .stderr(Stdio::piped())
            .output()
            .expect("cannot run cargo to build the release binary");
        assert!(
            out.status.success(),
            "cargo build --release --bin forkd failed:\n{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let exe = String::from_utf8_lossy(&out.stdout)
            .lines()
            .filter_map(|l| serde_json::from_str::<serde_json::Value>(l).ok())
            .filter(|m| m["reason"] == "compiler-artifact" && m["target"]["name"] == "forkd")
            .find_map(|m| m["executable"].as_str().map(PathBuf::from))
            .expect("cargo named no forkd executable");
        eprintln!(
            "release binary {} (cargo build took {:.1}s)",
            exe.display(),
            started.elapsed().as_secs_f64()
        );
        exe
    })
}

// ---------------------------------------------------------------- polling

/// Polls `f` until it returns `Some`, or fails naming `what` after `limit`.
pub fn eventually_within<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(
            Instant::now() < until,
            "timed out after {limit:?} waiting for {what}"
        );
        std::thread::sleep(TICK);
    }
}

/// [`eventually_within`] the suite's [`DEADLINE`].
pub fn eventually<T>(what: &str, f: impl FnMut() -> Option<T>) -> T {
    eventually_within(what, DEADLINE, f)
}

// ---------------------------------------------------------------- randomness

/// A small seeded generator (splitmix64): failures print the seed, and the
/// `FORKD_FAULT_SEED` environment variable replays a run.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// From `FORKD_FAULT_SEED`, else from the clock; prints the seed with `what`.
    pub fn from_env(what: &str) -> Rng {
        let seed = std::env::var("FORKD_FAULT_SEED")
            .ok()
            .and_then(|s| s.parse().ok())
            .unwrap_or_else(|| {
                std::time::SystemTime::now()
                    .duration_since(std::time::UNIX_EPOCH)
                    .map_or(1, |d| d.as_nanos() as u64)
            });
        eprintln!("{what}: FORKD_FAULT_SEED={seed}");
        Rng(seed)
    }

    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }

    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }

    /// Uniform in `lo..hi` (`hi > lo`).
    pub fn range(&mut self, lo: u64, hi: u64) -> u64 {
        lo + self.next_u64() % (hi - lo).max(1)
    }
}

/// An environment variable as a number, else `default`.
pub fn env_u64(name: &str, default: u64) -> u64 {
    std::env::var(name)
        .ok()
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(default)
}

// ---------------------------------------------------------------- a forkd process

/// A running `forkd run --config PATH` (the release binary). Its stderr is
/// collected line by line; it is killed when dropped.
pub struct Forkd {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

impl Forkd {
    /// Starts forkd on `config` and waits for its `forkd started` line.
    pub fn start(config: &Path) -> Forkd {
        Self::start_with(config, &[])
    }

    /// [`Forkd::start`] with extra environment variables.
    pub fn start_with(config: &Path, env: &[(&str, &str)]) -> Forkd {
        let mut cmd = Command::new(release_bin());
        cmd.env_remove("RUST_LOG").env_remove("RUST_BACKTRACE");
        for (k, _) in std::env::vars_os() {
            if k.to_string_lossy().starts_with("FORKD__") {
                cmd.env_remove(k);
            }
        }
        // Warnings, plus the `forkd started` line that names the addresses.
        cmd.env("FORKD__LOG__LEVEL", "warn,forkd::app=info")
            .env("FORKD__LOG__FORMAT", "text");
        for (k, v) in env {
            cmd.env(k, v);
        }
        cmd.args(["run", "--config"]).arg(config);
        let Started {
            child,
            stderr,
            addr,
            admin,
        } = spawn_started(cmd);
        Forkd {
            child,
            stderr,
            addr,
            admin,
        }
    }

    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything forkd wrote to stderr so far.
    pub fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    pub fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    /// SIGKILL, then waits for the exit.
    pub fn kill9(&mut self) -> ExitStatus {
        self.child.kill().unwrap();
        self.child.wait().unwrap()
    }

    /// SIGTERM, then waits (with the deadline) for the exit.
    pub fn terminate(&mut self) -> ExitStatus {
        let status = Command::new("kill")
            .args(["-TERM", &self.pid().to_string()])
            .status()
            .unwrap();
        assert!(status.success(), "kill -TERM {} failed", self.pid());
        let child = &mut self.child;
        eventually("forkd to exit after SIGTERM", || child.try_wait().unwrap())
    }

    /// Resident set size, from `/proc/<pid>/status`, in KiB.
    pub fn rss_kib(&self) -> u64 {
        let status = std::fs::read_to_string(format!("/proc/{}/status", self.pid())).unwrap();
        status
            .lines()
            .find_map(|l| l.strip_prefix("VmRSS:"))
            .and_then(|v| v.trim().trim_end_matches("kB").trim().parse().ok())
            .unwrap_or_else(|| panic!("no VmRSS in /proc/{}/status", self.pid()))
    }

    /// Open file descriptors of the process.
    pub fn open_fds(&self) -> usize {
        std::fs::read_dir(format!("/proc/{}/fd", self.pid()))
            .map(|d| d.count())
            .unwrap_or(0)
    }

    pub fn admin_get(&self, path: &str) -> Response {
        request(self.admin, "GET", path, &[], b"").unwrap_or_else(|e| panic!("GET {path}: {e}"))
    }

    pub fn status(&self) -> serde_json::Value {
        let r = self.admin_get("/status");
        assert_eq!(r.status, 200, "{}", r.text());
        serde_json::from_slice(&r.body).unwrap()
    }

    pub fn metrics(&self) -> Metrics {
        let r = self.admin_get("/metrics");
        assert_eq!(r.status, 200, "{}", r.text());
        Metrics(r.text())
    }

    /// One series' value; fails when it is not exported.
    pub fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let m = self.metrics();
        m.get(name, labels)
            .unwrap_or_else(|| panic!("series {name}{labels:?} not exported:\n{}", m.0))
    }

    pub fn readyz(&self) -> u16 {
        self.admin_get("/readyz").status
    }

    /// `POST path` with `X-Request-Id: id` on a fresh connection.
    pub fn post(&self, path: &str, id: &str, body: &[u8]) -> Response {
        request(self.addr, "POST", path, &[("X-Request-Id", id)], body)
            .unwrap_or_else(|e| panic!("POST {path} ({id}): {e}"))
    }

    /// Fails when forkd's stderr shows a panic.
    pub fn assert_no_panic(&self) {
        assert_no_panic(&self.stderr());
    }
}

impl Drop for Forkd {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

pub fn assert_no_panic(stderr: &str) {
    for needle in ["panicked", "stack backtrace", "RUST_BACKTRACE"] {
        assert!(!stderr.contains(needle), "forkd stderr:\n{stderr}");
    }
}

/// A `forkd run` child that logged `forkd started`.
pub struct Started {
    pub child: Child,
    /// Its stderr, line by line, collected by a thread.
    pub stderr: Arc<Mutex<Vec<String>>>,
    pub addr: SocketAddr,
    pub admin: SocketAddr,
}

/// Spawns `cmd` with its stderr collected line by line by a thread (which
/// ends when the pipe closes, i.e. when the process has exited).
pub fn spawn_collecting_stderr(
    mut cmd: Command,
) -> (Child, Arc<Mutex<Vec<String>>>, JoinHandle<()>) {
    let mut child = cmd
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let lines = Arc::new(Mutex::new(Vec::new()));
    let reader = {
        let lines = lines.clone();
        let pipe = child.stderr.take().unwrap();
        std::thread::spawn(move || {
            for line in BufReader::new(pipe).lines() {
                let Ok(line) = line else { break };
                lines.lock().unwrap().push(line);
            }
        })
    };
    (child, lines, reader)
}

/// Spawns `cmd` (a `forkd run ...`), collects its stderr and waits until it
/// logs `forkd started`; the addresses are read from that line. Panics with
/// the stderr when forkd exits first or does not start within [`DEADLINE`].
pub fn spawn_started(cmd: Command) -> Started {
    let (mut child, stderr, _reader) = spawn_collecting_stderr(cmd);
    let until = Instant::now() + DEADLINE;
    let (addr, admin) = loop {
        let started = stderr
            .lock()
            .unwrap()
            .iter()
            .find(|l| l.contains("forkd started"))
            .cloned();
        if let Some(line) = started {
            break (
                field(&line, "addr").unwrap_or_else(|| panic!("no addr in {line:?}")),
                field(&line, "admin_addr").unwrap_or_else(|| panic!("no admin_addr in {line:?}")),
            );
        }
        if let Some(status) = child.try_wait().unwrap() {
            // Let the reader thread catch the last lines.
            std::thread::sleep(Duration::from_millis(200));
            panic!(
                "forkd exited with {status} before starting:\n{}",
                stderr.lock().unwrap().join("\n")
            );
        }
        if Instant::now() > until {
            let _ = child.kill();
            panic!(
                "forkd did not start:\n{}",
                stderr.lock().unwrap().join("\n")
            );
        }
        std::thread::sleep(TICK);
    };
    Started {
        child,
        stderr,
        addr: addr.parse().unwrap(),
        admin: admin.parse().unwrap(),
    }
}

/// `key=value` from a text-format log line.
fn field(line: &str, key: &str) -> Option<String> {
    let prefix = format!("{key}=");
    line.split_whitespace()
        .find_map(|tok| tok.strip_prefix(&prefix))
        .map(|v| v.trim_matches('"').to_owned())
}

// ---------------------------------------------------------------- a blocking HTTP/1.1 client

/// An HTTP response.
#[derive(Debug, Clone)]
pub struct Response {
    pub status: u16,
    pub headers: Vec<(String, String)>,
    pub body: Vec<u8>,
}

impl Response {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<&str> {
        self.headers
            .iter()
            .find(|(k, _)| k.eq_ignore_ascii_case(name))
            .map(|(_, v)| v.as_str())
    }
}

/// One exchange on a fresh connection (`Connection: close`).
pub fn request(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> std::io::Result<Response> {
    let mut c = Conn::connect(addr, DEADLINE)?;
    let mut all: Vec<(&str, &str)> = headers.to_vec();
    all.push(("Connection", "close"));
    c.exchange(method, path, &all, body)
}

/// A keep-alive HTTP/1.1 connection for request/response exchanges with a
/// `Content-Length` body (forkd always answers with one).
pub struct Conn {
    stream: TcpStream,
    buf: Vec<u8>,
    closed: bool,
}

impl Conn {
    pub fn connect(addr: SocketAddr, timeout: Duration) -> std::io::Result<Conn> {
        let stream = TcpStream::connect_timeout(&addr, timeout)?;
        stream.set_read_timeout(Some(timeout))?;
        stream.set_write_timeout(Some(timeout))?;
        stream.set_nodelay(true)?;
        Ok(Conn {
            stream,
            buf: Vec::new(),
            closed: false,
        })
    }

    /// True once the server said `Connection: close`.
    pub fn is_closed(&self) -> bool {
        self.closed
    }

    pub fn exchange(
        &mut self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: &[u8],
    ) -> std::io::Result<Response> {
        let mut req = format!(
            "{method} {path} HTTP/1.1\r\nHost: forkd\r\nContent-Length: {}\r\n",
            body.len()
        );
        for (k, v) in headers {
            req.push_str(&format!("{k}: {v}\r\n"));
        }
        req.push_str("\r\n");
        let mut bytes = req.into_bytes();
        bytes.extend_from_slice(body);
        self.stream.write_all(&bytes)?;
        self.read_response(method == "HEAD")
    }

    fn fill(&mut self) -> std::io::Result<()> {
        let mut chunk = [0u8; 16 << 10];
        let n = self.stream.read(&mut chunk)?;
        if n == 0 {
            return Err(std::io::Error::new(
                std::io::ErrorKind::UnexpectedEof,
                "connection closed by forkd",
            ));
        }
        self.buf.extend_from_slice(&chunk[..n]);
        Ok(())
    }

    fn read_response(&mut self, head_only: bool) -> std::io::Result<Response> {
        let end = loop {
            if let Some(end) = self.buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break end;
            }
            self.fill()?;
        };
        let head = String::from_utf8_lossy(&self.buf[..end]).into_owned();
        self.buf.drain(..end + 4);
        let mut lines = head.split("\r\n");
        let status: u16 = lines
            .next()
            .and_then(|l| l.split_whitespace().nth(1))
            .and_then(|s| s.parse().ok())
            .ok_or_else(|| std::io::Error::other(format!("bad status line in {head:?}")))?;
        let headers: Vec<(String, String)> = lines
            .filter_map(|l| l.split_once(':'))
            .map(|(k, v)| (k.trim().to_owned(), v.trim().to_owned()))
            .collect();
        let get = |name: &str| {
            headers
                .iter()
                .find(|(k, _)| k.eq_ignore_ascii_case(name))
                .map(|(_, v)| v.clone())
        };
        if get("connection").is_some_and(|v| v.eq_ignore_ascii_case("close")) {
            self.closed = true;
        }
        let len: usize = if head_only {
            0
        } else {
            get("content-length")
                .and_then(|v| v.parse().ok())
                .unwrap_or(0)
        };
        while self.buf.len() < len {
            self.fill()?;
        }
        let body = self.buf.drain(..len).collect();
        Ok(Response {
            status,
            headers,
            body,
        })
    }
}

// ---------------------------------------------------------------- sequence-numbered load

/// A client's request `seq`: its tag (also its `X-Request-Id`) and its body.
/// The body's length varies with the pair, so a mixed-up body is caught.
pub fn tagged_body(client: usize, seq: u64) -> (String, Vec<u8>) {
    let tag = format!("c{client:02}-s{seq:07}");
    let mut rng = Rng::new(((client as u64) << 40) ^ seq);
    let len = rng.range(64, 2048) as usize;
    let mut body = format!("{tag}|").into_bytes();
    while body.len() < len {
        body.push(b'a' + (rng.next_u64() % 26) as u8);
    }
    (tag, body)
}

/// Parses a body made by [`tagged_body`]; `None` when it is not one of them,
/// or not byte for byte what that client sent for that sequence number.
pub fn parse_tagged(body: &[u8]) -> Option<(usize, u64)> {
    let text = std::str::from_utf8(body.get(..16)?).ok()?;
    let client: usize = text.get(1..3)?.parse().ok()?;
    let seq: u64 = text.get(5..12)?.parse().ok()?;
    (tagged_body(client, seq).1 == body).then_some((client, seq))
}

/// Where the clients send: the address of the forkd currently running, or
/// `None` while it is down (clients wait).
#[derive(Clone, Default)]
pub struct Endpoint(Arc<RwLock<Option<SocketAddr>>>);

impl Endpoint {
    pub fn set(&self, addr: Option<SocketAddr>) {
        *self.0.write().unwrap() = addr;
    }

    pub fn get(&self) -> Option<SocketAddr> {
        *self.0.read().unwrap()
    }
}

/// What one client did.
#[derive(Debug, Default, Clone)]
pub struct ClientLog {
    pub client: usize,
    /// Sequence numbers answered 2xx, in order (each once).
    pub acked: Vec<u64>,
    pub attempts: u64,
    /// Attempts that got no answer (connection refused, reset, timeout).
    pub errors: u64,
    /// Answers by status.
    pub statuses: BTreeMap<u16, u64>,
}

/// Clients sending sequence-numbered requests, one at a time each, until
/// stopped or bounded by count and time. A request that is not acknowledged
/// (error or non-2xx) is retried with the same body and request id, as a
/// real client would.
pub struct Load {
    stop: Arc<AtomicBool>,
    acked: Arc<AtomicU64>,
    threads: Vec<JoinHandle<ClientLog>>,
}

impl Load {
    /// Clients as fast as forkd answers them.
    pub fn start(
        clients: usize,
        endpoint: Endpoint,
        max_per_client: u64,
        time_limit: Duration,
    ) -> Load {
        Self::paced(clients, endpoint, max_per_client, time_limit, None)
    }

    /// Clients that start a request at most every `interval` each (a steady
    /// rate, as telemetry agents send), or as fast as answered with `None`.
    pub fn paced(
        clients: usize,
        endpoint: Endpoint,
        max_per_client: u64,
        time_limit: Duration,
        interval: Option<Duration>,
    ) -> Load {
        let stop = Arc::new(AtomicBool::new(false));
        let acked = Arc::new(AtomicU64::new(0));
        let threads = (0..clients)
            .map(|client| {
                let stop = stop.clone();
                let acked = acked.clone();
                let endpoint = endpoint.clone();
                std::thread::spawn(move || {
                    run_client(
                        client,
                        &endpoint,
                        &stop,
                        &acked,
                        (max_per_client, time_limit),
                        interval,
                    )
                })
            })
            .collect();
        Load {
            stop,
            acked,
            threads,
        }
    }

    /// Requests acknowledged so far, all clients together.
    pub fn acked(&self) -> u64 {
        self.acked.load(Ordering::Relaxed)
    }

    /// Stops the clients (each finishes its request in flight) and returns their logs.
    pub fn stop(self) -> Vec<ClientLog> {
        self.stop.store(true, Ordering::Relaxed);
        self.threads
            .into_iter()
            .map(|t| t.join().unwrap())
            .collect()
    }
}

fn run_client(
    client: usize,
    endpoint: &Endpoint,
    stop: &AtomicBool,
    acked: &AtomicU64,
    (max, time_limit): (u64, Duration),
    interval: Option<Duration>,
) -> ClientLog {
    let started = Instant::now();
    let mut last_start = started;
    let mut log = ClientLog {
        client,
        ..ClientLog::default()
    };
    let mut conn: Option<(SocketAddr, Conn)> = None;
    let mut seq = 0u64;
    let (mut tag, mut body) = tagged_body(client, seq);
    while seq < max && !stop.load(Ordering::Relaxed) && started.elapsed() < time_limit {
        let Some(addr) = endpoint.get() else {
            conn = None;
            std::thread::sleep(Duration::from_millis(5));
            continue;
        };
        if conn
            .as_ref()
            .is_none_or(|(a, c)| *a != addr || c.is_closed())
        {
            conn = Conn::connect(addr, Duration::from_secs(30))
                .ok()
                .map(|c| (addr, c));
        }
        if let Some(every) = interval {
            // The client's own rate, not a synchronisation.
            let next = last_start + every;
            if let Some(wait) = next.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
        last_start = Instant::now();
        log.attempts += 1;
        let result = match conn.as_mut() {
            Some((_, c)) => c.exchange(
                "POST",
                "/v1/ingest",
                &[("X-Request-Id", &tag), ("Content-Type", "text/plain")],
                &body,
            ),
            None => Err(std::io::Error::other("cannot connect")),
        };
        match result {
            Ok(r) => {
                *log.statuses.entry(r.status).or_default() += 1;
                if (200..300).contains(&r.status) {
                    log.acked.push(seq);
                    acked.fetch_add(1, Ordering::Relaxed);
                    seq += 1;
                    (tag, body) = tagged_body(client, seq);
                } else {
                    // A client's pause before it retries, not a synchronisation.
                    std::thread::sleep(Duration::from_millis(20));
                }
            }
            Err(_) => {
                log.errors += 1;
                conn = None;
                std::thread::sleep(Duration::from_millis(5));
            }
        }
    }
    log
}

/// What one target received, checked against what the clients were told.
#[derive(Debug, Default)]
pub struct DeliveryReport {
    pub target: String,
    /// Requests answered 2xx by the target, duplicates included.
    pub deliveries: usize,
    /// Distinct (client, seq) pairs among them.
    pub distinct: usize,
    pub duplicates: usize,
    /// Acknowledged to a client and never delivered.
    pub missing: Vec<(usize, u64)>,
    /// Per client, a first arrival of a lower seq after a higher one.
    pub reordered: Vec<String>,
    /// Bodies that no client sent.
    pub invented: usize,
}

impl DeliveryReport {
    pub fn is_complete_and_ordered(&self) -> bool {
        self.missing.is_empty() && self.reordered.is_empty() && self.invented == 0
    }

    pub fn line(&self) -> String {
        format!(
            "{}: {} deliveries, {} distinct, {} duplicates, {} missing, {} reordered, {} invented",
            self.target,
            self.deliveries,
            self.distinct,
            self.duplicates,
            self.missing.len(),
            self.reordered.len(),
            self.invented
        )
    }
}

/// Checks a target's deliveries: every acknowledged request is there
/// (at-least-once), first arrivals of each client are in its sequence order,
/// nothing was invented; counts the duplicates.
pub fn check_delivery(target: &str, delivered: &[Received], logs: &[ClientLog]) -> DeliveryReport {
    let mut report = DeliveryReport {
        target: target.to_owned(),
        deliveries: delivered.len(),
        ..DeliveryReport::default()
    };
    let mut seen: BTreeMap<(usize, u64), usize> = BTreeMap::new();
    let mut last_first: BTreeMap<usize, u64> = BTreeMap::new();
    for r in delivered {
        let Some((client, seq)) = parse_tagged(&r.body) else {
            report.invented += 1;
            continue;
        };
        let n = seen.entry((client, seq)).or_default();
        *n += 1;
        if *n > 1 {
            report.duplicates += 1;
            continue;
        }
        if let Some(&prev) = last_first.get(&client)
            && seq < prev
        {
            report.reordered.push(format!(
                "client {client}: seq {seq} first arrived after seq {prev}"
            ));
        }
        let last = last_first.entry(client).or_insert(seq);
        *last = (*last).max(seq);
    }
    report.distinct = seen.len();
    for log in logs {
        for &seq in &log.acked {
            if !seen.contains_key(&(log.client, seq)) {
                report.missing.push((log.client, seq));
            }
        }
    }
    report
}

/// Every (client, seq) acknowledged, for waiting on delivery.
pub fn acked_set(logs: &[ClientLog]) -> std::collections::BTreeSet<(usize, u64)> {
    logs.iter()
        .flat_map(|l| l.acked.iter().map(move |&s| (l.client, s)))
        .collect()
}

/// True when every acknowledged request is among `delivered`.
pub fn all_delivered(delivered: &[Received], logs: &[ClientLog]) -> bool {
    let got: std::collections::BTreeSet<(usize, u64)> = delivered
        .iter()
        .filter_map(|r| parse_tagged(&r.body))
        .collect();
    acked_set(logs).is_subset(&got)
}

// ---------------------------------------------------------------- sinks and the runtime

/// A runtime for the in-process sinks (and flappers) of a test.
pub fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

/// A test's files: the config and the spool directory.
pub struct Setup {
    pub dir: tempfile::TempDir,
}

impl Setup {
    pub fn new() -> Setup {
        Setup {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    pub fn spool_dir(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    pub fn config_path(&self) -> PathBuf {
        self.dir.path().join("forkd.toml")
    }

    /// Renders `conf` with `buffer.dir` = `spool` and writes it; returns its path.
    pub fn write(&self, conf: &crate::common::Conf, spool: &Path) -> PathBuf {
        let path = self.config_path();
        std::fs::write(&path, conf.render(spool)).unwrap();
        path
    }
}

impl Default for Setup {
    fn default() -> Self {
        Self::new()
    }
}
