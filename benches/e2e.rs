#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! End to end: the release `forkd` binary (and nginx, when installed) between
//! a hyper load generator and two sink processes on loopback.
//!
//! `cargo bench --bench e2e` runs everything (about 6 minutes with the
//! defaults); `cargo bench --bench e2e -- --help` lists the knobs. Without
//! `--bench` on its command line (`cargo test --benches`, `cargo bench
//! --no-run` then running the binary) it measures nothing and exits at once.
//!
//! Layout on a machine with at least 2 cores: the proxy (forkd or nginx) runs
//! pinned to the first core and, when cgroups are writable, capped at 50 % of
//! it (cgroup v2 `cpu.max` = "50000 100000", or the cgroup v1 CFS quota with
//! the same numbers where the cpu controller is on v1). The load generator
//! (this process) and the sinks (this binary re-executed as `--sink ADDR`)
//! run pinned to the last core. The proxy is then the bottleneck, so the
//! figures compare proxies and not the load generator.
//!
//! Measured per row: req/s, body MiB/s, latency p50/p99/p99.9, proxy CPU
//! (utime + stime from /proc/<pid>/stat over the measured window, summed over
//! the proxy's processes) per request and as a share of one core, the busy
//! share of both cores (from /proc/stat), and the proxy's peak RSS (VmHWM).
//!
//! Rows: direct to one sink (the ceiling), forkd single target, nginx proxy,
//! forkd active-active, nginx mirror — repeated in `ROUNDS` paired rounds with
//! per-round ratios — then forkd active-active with the backup down
//! (spooling, `fsync = "always"`) beside fio with the clients' write pattern
//! (K writers of S-byte records, fdatasync after each) and the spool's own
//! (the bytes of one group commit per fdatasync), the
//! drain after the outage under continuing live load, RSS with 1,000 idle
//! keep-alive connections, and RSS with a stalled target.

use std::collections::BTreeMap;
use std::convert::Infallible;
use std::io::{BufRead, BufReader, Read, Write};
use std::net::{SocketAddr, TcpStream as StdTcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{Request, Response, StatusCode};
use http_body_util::{BodyExt, Empty, Full};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::TokioIo;

const NGINX_PROXY_CONF: &str = include_str!("peers/nginx-proxy.conf");
const NGINX_MIRROR_CONF: &str = include_str!("peers/nginx-mirror.conf");
const FORKD: &str = env!("CARGO_BIN_EXE_forkd");
const TMP_ROOT: &str = env!("CARGO_TARGET_TMPDIR");
/// The whole run is aborted after this long.
const WATCHDOG: Duration = Duration::from_secs(20 * 60);
/// Longest wait for a drain to finish.
const DRAIN_LIMIT: Duration = Duration::from_secs(60);
const PATH: &str = "/v1/logs";
const MIB: f64 = 1048576.0;

fn main() -> ExitCode {
    let args: Vec<String> = std::env::args().skip(1).collect();
    if args.first().map(String::as_str) == Some("--sink") {
        sink_main(&args[1..]);
        return ExitCode::SUCCESS;
    }
    if args.iter().any(|a| a == "--help" || a == "-h") {
        print!("{HELP}");
        return ExitCode::SUCCESS;
    }
    if !args.iter().any(|a| a == "--bench") {
        println!("e2e: test mode, nothing measured (run `cargo bench --bench e2e`)");
        return ExitCode::SUCCESS;
    }
    let cores = online_cores();
    // Pin this process (the load generator, and the sinks it starts) to the
    // load core by re-executing it under taskset.
    if std::env::var_os("FORKD_E2E_PINNED").is_none() && cores.len() >= 2 && have("taskset") {
        let load_core = cores[cores.len() - 1];
        let status = Command::new("taskset")
            .arg("-c")
            .arg(load_core.to_string())
            .arg(std::env::current_exe().expect("current exe"))
            .args(&args)
            .env("FORKD_E2E_PINNED", "1")
            .env(
                "FORKD_E2E_CORES",
                cores
                    .iter()
                    .map(usize::to_string)
                    .collect::<Vec<_>>()
                    .join(","),
            )
            .status();
        return match status {
            Ok(s) if s.success() => ExitCode::SUCCESS,
            Ok(_) => ExitCode::FAILURE,
            Err(e) => {
                eprintln!("e2e: cannot re-execute under taskset: {e}");
                ExitCode::FAILURE
            }
        };
    }
    std::thread::spawn(|| {
        std::thread::sleep(WATCHDOG);
        eprintln!("e2e: watchdog: the run took longer than {WATCHDOG:?}; aborting");
        std::process::exit(3);
    });
    let settings = Settings::from_env();
    let bench = Bench::new(settings, cores);
    bench.run();
    ExitCode::SUCCESS
}

const HELP: &str = "\
cargo bench --bench e2e            run every row
Environment (all bounded):
  FORKD_E2E_CONNS=64               K: client connections (1..=4096)
  FORKD_E2E_BODY=4096              S: body bytes (1..=16777216)
  FORKD_E2E_SECONDS=5              T: measured seconds per row (1..=120)
  FORKD_E2E_ROUNDS=3               paired rounds of the comparison rows (1..=10)
  FORKD_E2E_WARMUP_MS=1000         unmeasured warm-up before each row (0..=10000)
  FORKD_E2E_ONLY=compare,spool,idle,stall   row groups to run (default: all)
  FORKD_E2E_NO_CAP=1               do not cap the proxy (pinning stays)
  FORKD_E2E_SPOOL_CAP=1            cap forkd in the spool/drain row too
  FORKD_E2E_DRAIN_CONCURRENCY=64   buffer.drain_concurrency in the drain row
  FORKD_E2E_DRAIN_LIVE_RPS=5000    live load during the drain, req/s over K connections
                                   (0: closed loop, as fast as forkd answers)
  FORKD_E2E_BASELINE_BIN=PATH      also measure this forkd binary (e.g. an older build)
                                   in the comparison rounds: paired before/after
  FORKD_E2E_FORKD_WORKERS=N        TOKIO_WORKER_THREADS for forkd (default: tokio's)
  FORKD_E2E_KEEP=1                 keep the temp dir (configs, logs) for inspection
  FORKD_E2E_PERF=1|dwarf|stat|sched
                                   perf record -g (or --call-graph dwarf) of the proxy in each
                                   comparison row and in the spool row (implies KEEP); stat:
                                   system calls per request; sched: context switches, wake-ups
                                   and the spool's writev/fdatasync/futex tracepoints
";

// ---------------------------------------------------------------- settings

#[derive(Debug, Clone)]
struct Settings {
    conns: usize,
    body: usize,
    seconds: u64,
    rounds: usize,
    warmup: Duration,
    groups: Vec<String>,
    cap: bool,
    spool_cap: bool,
    drain_concurrency: usize,
    drain_live_rps: u64,
    /// Another forkd binary measured beside this one (paired before/after).
    baseline: Option<String>,
    forkd_workers: Option<usize>,
    keep: bool,
}

fn env_num(name: &str, default: u64, min: u64, max: u64) -> u64 {
    match std::env::var(name) {
        Ok(v) => match v.trim().parse::<u64>() {
            Ok(n) if (min..=max).contains(&n) => n,
            _ => {
                eprintln!("e2e: {name}={v:?} is not in {min}..={max}; using {default}");
                default
            }
        },
        Err(_) => default,
    }
}

fn env_flag(name: &str) -> bool {
    std::env::var(name).is_ok_and(|v| !v.is_empty() && v != "0")
}

impl Settings {
    fn from_env() -> Self {
        let groups = std::env::var("FORKD_E2E_ONLY")
            .map(|v| v.split(',').map(|s| s.trim().to_owned()).collect())
            .unwrap_or_else(|_| {
                ["compare", "spool", "idle", "stall"]
                    .map(String::from)
                    .to_vec()
            });
        Settings {
            conns: env_num("FORKD_E2E_CONNS", 64, 1, 4096) as usize,
            body: env_num("FORKD_E2E_BODY", 4096, 1, 16 << 20) as usize,
            seconds: env_num("FORKD_E2E_SECONDS", 5, 1, 120),
            rounds: env_num("FORKD_E2E_ROUNDS", 3, 1, 10) as usize,
            warmup: Duration::from_millis(env_num("FORKD_E2E_WARMUP_MS", 1000, 0, 10_000)),
            groups,
            cap: !env_flag("FORKD_E2E_NO_CAP"),
            spool_cap: env_flag("FORKD_E2E_SPOOL_CAP"),
            drain_concurrency: env_num("FORKD_E2E_DRAIN_CONCURRENCY", 64, 1, 4096) as usize,
            drain_live_rps: env_num("FORKD_E2E_DRAIN_LIVE_RPS", 5000, 0, 1_000_000),
            baseline: std::env::var("FORKD_E2E_BASELINE_BIN")
                .ok()
                .filter(|p| Path::new(p).is_file()),
            forkd_workers: std::env::var("FORKD_E2E_FORKD_WORKERS")
                .ok()
                .map(|_| env_num("FORKD_E2E_FORKD_WORKERS", 1, 1, 64) as usize),
            keep: env_flag("FORKD_E2E_KEEP") || env_flag("FORKD_E2E_PERF"),
        }
    }

    fn wants(&self, group: &str) -> bool {
        self.groups.iter().any(|g| g == group)
    }
}

// ---------------------------------------------------------------- processes

fn have(program: &str) -> bool {
    Command::new(program)
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

fn online_cores() -> Vec<usize> {
    // Set by the parent before it pinned this process to the load core.
    if let Ok(list) = std::env::var("FORKD_E2E_CORES") {
        let cores: Vec<usize> = list.split(',').filter_map(|c| c.parse().ok()).collect();
        if !cores.is_empty() {
            return cores;
        }
    }
    // The cores this process may run on (respects an outer taskset).
    let mut cores = Vec::new();
    if let Ok(status) = std::fs::read_to_string("/proc/self/status")
        && let Some(line) = status.lines().find(|l| l.starts_with("Cpus_allowed_list:"))
    {
        for part in line["Cpus_allowed_list:".len()..].trim().split(',') {
            match part.split_once('-') {
                Some((a, b)) => {
                    if let (Ok(a), Ok(b)) = (a.parse::<usize>(), b.parse::<usize>()) {
                        cores.extend(a..=b);
                    }
                }
                None => {
                    if let Ok(a) = part.parse() {
                        cores.push(a);
                    }
                }
            }
        }
    }
    if cores.is_empty() {
        cores.push(0);
    }
    cores
}

/// A child process, killed and reaped when dropped.
struct Proc {
    name: String,
    child: Child,
}

impl Proc {
    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn alive(&mut self) -> bool {
        matches!(self.child.try_wait(), Ok(None))
    }
}

impl Drop for Proc {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// utime + stime of one process, in clock ticks.
fn cpu_ticks(pid: u32) -> u64 {
    let Ok(stat) = std::fs::read_to_string(format!("/proc/{pid}/stat")) else {
        return 0;
    };
    let Some(rest) = stat.rsplit_once(')').map(|(_, r)| r) else {
        return 0;
    };
    let f: Vec<&str> = rest.split_whitespace().collect();
    let n = |i: usize| f.get(i).and_then(|v| v.parse::<u64>().ok()).unwrap_or(0);
    n(11) + n(12)
}

fn parent_of(pid: u32) -> Option<u32> {
    let stat = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    let rest = stat.rsplit_once(')')?.1;
    rest.split_whitespace().nth(1)?.parse().ok()
}

/// `pid` and its descendants.
fn process_tree(pid: u32) -> Vec<u32> {
    let mut all: Vec<(u32, u32)> = Vec::new();
    if let Ok(dir) = std::fs::read_dir("/proc") {
        for e in dir.flatten() {
            if let Some(p) = e.file_name().to_str().and_then(|s| s.parse::<u32>().ok())
                && let Some(pp) = parent_of(p)
            {
                all.push((p, pp));
            }
        }
    }
    let mut tree = vec![pid];
    let mut i = 0;
    while i < tree.len() {
        let parent = tree[i];
        tree.extend(all.iter().filter(|(_, pp)| *pp == parent).map(|(p, _)| *p));
        i += 1;
    }
    tree
}

fn tree_ticks(pid: u32) -> u64 {
    process_tree(pid).into_iter().map(cpu_ticks).sum()
}

/// A `/proc/<pid>/status` field in KiB (VmHWM, VmRSS), summed over the process tree.
fn tree_status_kib(pid: u32, field: &str) -> u64 {
    process_tree(pid)
        .into_iter()
        .map(|p| {
            std::fs::read_to_string(format!("/proc/{p}/status"))
                .ok()
                .and_then(|s| {
                    s.lines()
                        .find(|l| l.starts_with(field))
                        .and_then(|l| l.split_whitespace().nth(1))
                        .and_then(|v| v.parse::<u64>().ok())
                })
                .unwrap_or(0)
        })
        .sum()
}

fn clock_ticks_per_second() -> f64 {
    Command::new("getconf")
        .arg("CLK_TCK")
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .and_then(|s| s.trim().parse::<f64>().ok())
        .unwrap_or(100.0)
}

/// Busy and total jiffies of each core.
type Jiffies = BTreeMap<usize, (u64, u64)>;

/// Busy and total jiffies of each core, from /proc/stat.
fn core_jiffies() -> Jiffies {
    let mut out = BTreeMap::new();
    let Ok(stat) = std::fs::read_to_string("/proc/stat") else {
        return out;
    };
    for line in stat.lines() {
        let mut f = line.split_whitespace();
        let Some(name) = f.next() else { continue };
        let Some(n) = name
            .strip_prefix("cpu")
            .and_then(|n| n.parse::<usize>().ok())
        else {
            continue;
        };
        let v: Vec<u64> = f.filter_map(|x| x.parse().ok()).collect();
        if v.len() < 5 {
            continue;
        }
        let total: u64 = v.iter().take(8).sum();
        let idle = v[3] + v[4];
        out.insert(n, (total - idle, total));
    }
    out
}

fn free_port() -> u16 {
    let l = std::net::TcpListener::bind("127.0.0.1:0").expect("bind a free port");
    l.local_addr().expect("local addr").port()
}

fn wait_port(port: u16, proc_: &mut Proc) -> Result<(), String> {
    let until = Instant::now() + Duration::from_secs(15);
    while Instant::now() < until {
        if StdTcpStream::connect(("127.0.0.1", port)).is_ok() {
            return Ok(());
        }
        if !proc_.alive() {
            return Err(format!("{} exited before listening", proc_.name));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
    Err(format!("{} did not listen on {port} in 15 s", proc_.name))
}

/// A tiny blocking HTTP/1.1 GET (admin endpoints); returns the body.
fn http_get(port: u16, path: &str) -> Option<String> {
    let mut s = StdTcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(5))).ok()?;
    write!(
        s,
        "GET {path} HTTP/1.1\r\nHost: 127.0.0.1\r\nConnection: close\r\n\r\n"
    )
    .ok()?;
    let mut buf = Vec::new();
    s.read_to_end(&mut buf).ok()?;
    let text = String::from_utf8_lossy(&buf).into_owned();
    text.split_once("\r\n\r\n").map(|(_, b)| b.to_owned())
}

/// One sample of a Prometheus series (exact name and labels as exposed).
fn metric(text: &str, series: &str) -> f64 {
    text.lines()
        .find_map(|l| l.strip_prefix(series).and_then(|r| r.strip_prefix(' ')))
        .and_then(|v| v.trim().parse().ok())
        .unwrap_or(0.0)
}

// ---------------------------------------------------------------- cgroup cap

#[derive(Debug)]
enum CapKind {
    V2,
    V1,
}

/// A cgroup capping its members at 50 % of one core.
#[derive(Debug)]
struct Cap {
    dir: PathBuf,
    kind: CapKind,
}

impl Cap {
    const NAME: &str = "forkd-e2e-bench";

    fn setup() -> Result<Cap, String> {
        let mounts = std::fs::read_to_string("/proc/mounts").map_err(|e| e.to_string())?;
        let mut errors = Vec::new();
        // cgroup v2 with the cpu controller.
        for line in mounts.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 || f[2] != "cgroup2" {
                continue;
            }
            let root = PathBuf::from(f[1]);
            let controllers =
                std::fs::read_to_string(root.join("cgroup.controllers")).unwrap_or_default();
            if !controllers.split_whitespace().any(|c| c == "cpu") {
                errors.push(format!("{}: no cpu controller", root.display()));
                continue;
            }
            let _ = std::fs::write(root.join("cgroup.subtree_control"), "+cpu");
            let dir = root.join(Self::NAME);
            let _ = std::fs::remove_dir(&dir);
            let r = std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::write(dir.join("cpu.max"), "50000 100000"));
            match r {
                Ok(()) => {
                    return Ok(Cap {
                        dir,
                        kind: CapKind::V2,
                    });
                }
                Err(e) => errors.push(format!("{}: {e}", dir.display())),
            }
        }
        // cgroup v1 cpu controller (CFS quota): the same cap.
        for line in mounts.lines() {
            let f: Vec<&str> = line.split_whitespace().collect();
            if f.len() < 4 || f[2] != "cgroup" || !f[3].split(',').any(|o| o == "cpu") {
                continue;
            }
            let dir = PathBuf::from(f[1]).join(Self::NAME);
            let _ = std::fs::remove_dir(&dir);
            let r = std::fs::create_dir_all(&dir)
                .and_then(|()| std::fs::write(dir.join("cpu.cfs_period_us"), "100000"))
                .and_then(|()| std::fs::write(dir.join("cpu.cfs_quota_us"), "50000"));
            match r {
                Ok(()) => {
                    return Ok(Cap {
                        dir,
                        kind: CapKind::V1,
                    });
                }
                Err(e) => errors.push(format!("{}: {e}", dir.display())),
            }
        }
        if errors.is_empty() {
            errors.push("no cgroup mount with a cpu controller".into());
        }
        Err(errors.join("; "))
    }

    fn describe(&self) -> String {
        match self.kind {
            CapKind::V2 => format!("cgroup v2 {}/cpu.max = 50000 100000", self.dir.display()),
            CapKind::V1 => format!(
                "cgroup v1 {} cpu.cfs_quota_us = 50000, cpu.cfs_period_us = 100000 \
                 (the cpu controller is on v1 here; same cap as cpu.max \"50000 100000\")",
                self.dir.display()
            ),
        }
    }

    fn procs(&self) -> PathBuf {
        self.dir.join("cgroup.procs")
    }

    /// (periods, throttled periods) so far.
    fn throttling(&self) -> (u64, u64) {
        let s = std::fs::read_to_string(self.dir.join("cpu.stat")).unwrap_or_default();
        let get = |k: &str| {
            s.lines()
                .find_map(|l| l.strip_prefix(k).and_then(|r| r.trim().parse::<u64>().ok()))
                .unwrap_or(0)
        };
        (get("nr_periods "), get("nr_throttled "))
    }
}

impl Drop for Cap {
    fn drop(&mut self) {
        // Members are gone by now (every Proc is dropped first).
        for _ in 0..50 {
            if std::fs::remove_dir(&self.dir).is_ok() {
                return;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
    }
}

// ---------------------------------------------------------------- sink mode

/// `--sink ADDR [--stall]`: a minimal HTTP/1.1 server that reads each request
/// body and answers 200 with an empty body (or never answers with --stall).
/// Prints its port on stdout; exits when stdin closes (the bench went away).
fn sink_main(args: &[String]) {
    let addr: SocketAddr = args
        .first()
        .and_then(|a| a.parse().ok())
        .unwrap_or_else(|| SocketAddr::from(([127, 0, 0, 1], 0)));
    let stall = args.iter().any(|a| a == "--stall");
    std::thread::spawn(|| {
        let mut buf = [0u8; 64];
        let mut stdin = std::io::stdin();
        while let Ok(n) = stdin.read(&mut buf) {
            if n == 0 {
                break;
            }
        }
        std::process::exit(0);
    });
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket.set_reuseaddr(true).expect("reuseaddr");
        socket.bind(addr).expect("bind");
        let listener = socket.listen(4096).expect("listen");
        println!("{}", listener.local_addr().expect("addr").port());
        let _ = std::io::stdout().flush();
        loop {
            let Ok((stream, _)) = listener.accept().await else {
                continue;
            };
            let _ = stream.set_nodelay(true);
            tokio::spawn(async move {
                let service = service_fn(move |req: Request<Incoming>| sink_answer(req, stall));
                let _ = hyper::server::conn::http1::Builder::new()
                    .serve_connection(TokioIo::new(stream), service)
                    .await;
            });
        }
    });
}

async fn sink_answer(
    req: Request<Incoming>,
    stall: bool,
) -> Result<Response<Empty<Bytes>>, Infallible> {
    let mut body = req.into_body();
    while let Some(frame) = body.frame().await {
        if frame.is_err() {
            break;
        }
    }
    if stall {
        std::future::pending::<()>().await;
    }
    Ok(Response::new(Empty::new()))
}

fn start_sink(port: u16, stall: bool) -> (Proc, u16) {
    let mut cmd = Command::new(std::env::current_exe().expect("current exe"));
    cmd.arg("--sink").arg(format!("127.0.0.1:{port}"));
    if stall {
        cmd.arg("--stall");
    }
    let mut child = cmd
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::inherit())
        .spawn()
        .expect("start sink");
    let mut line = String::new();
    BufReader::new(child.stdout.take().expect("sink stdout"))
        .read_line(&mut line)
        .expect("sink port");
    let port = line.trim().parse().expect("sink printed its port");
    (
        Proc {
            name: format!("sink :{port}"),
            child,
        },
        port,
    )
}

// ---------------------------------------------------------------- load generator

#[derive(Debug, Default)]
struct LoadResult {
    ok: u64,
    non2xx: u64,
    errors: u64,
    statuses: BTreeMap<u16, u64>,
    lat_us: Vec<u32>,
    window: Duration,
}

impl LoadResult {
    fn merge(&mut self, o: LoadResult) {
        self.ok += o.ok;
        self.non2xx += o.non2xx;
        self.errors += o.errors;
        for (k, v) in o.statuses {
            *self.statuses.entry(k).or_default() += v;
        }
        self.lat_us.extend(o.lat_us);
    }

    fn percentile_ms(&self, p: f64) -> f64 {
        if self.lat_us.is_empty() {
            return f64::NAN;
        }
        let i = ((self.lat_us.len() as f64 - 1.0) * p).round() as usize;
        f64::from(self.lat_us[i]) / 1000.0
    }
}

/// When a load runs and when its measured window is.
#[derive(Debug, Clone)]
struct Window {
    measure_from: Instant,
    end: Instant,
    stop: Arc<AtomicBool>,
    /// Each connection sends at most one request per this interval (an
    /// open-loop rate); `None`: as fast as answers come back.
    pace: Option<Duration>,
}

/// Drives `conns` keep-alive connections, each sending POSTs of `body` one
/// after the other, until `w.end` or `w.stop`. Counts answers completed inside
/// [measure_from, end).
fn run_load(port: u16, conns: usize, body: Bytes, w: Window) -> LoadResult {
    let rt = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .expect("runtime");
    rt.block_on(async move {
        let mut tasks = tokio::task::JoinSet::new();
        for _ in 0..conns {
            tasks.spawn(conn_loop(port, body.clone(), w.clone()));
        }
        let mut total = LoadResult::default();
        while let Some(r) = tasks.join_next().await {
            if let Ok(r) = r {
                total.merge(r);
            }
        }
        total.lat_us.sort_unstable();
        total.window = w.end.saturating_duration_since(w.measure_from);
        total
    })
}

async fn conn_loop(port: u16, body: Bytes, w: Window) -> LoadResult {
    let mut r = LoadResult::default();
    let host = format!("127.0.0.1:{port}");
    let done = |w: &Window| Instant::now() >= w.end || w.stop.load(Ordering::Relaxed);
    'connect: while !done(&w) {
        let stream = match tokio::net::TcpStream::connect(("127.0.0.1", port)).await {
            Ok(s) => s,
            Err(_) => {
                if Instant::now() >= w.measure_from {
                    r.errors += 1;
                }
                tokio::time::sleep(Duration::from_millis(10)).await;
                continue;
            }
        };
        let _ = stream.set_nodelay(true);
        let Ok((mut tx, conn)) = hyper::client::conn::http1::handshake(TokioIo::new(stream)).await
        else {
            continue;
        };
        tokio::spawn(conn);
        let mut next_slot = Instant::now();
        while !done(&w) {
            if let Some(every) = w.pace {
                tokio::time::sleep_until(next_slot.into()).await;
                next_slot += every;
            }
            if tx.ready().await.is_err() {
                continue 'connect;
            }
            let req = Request::post(PATH)
                .header(http::header::HOST, host.as_str())
                .header(http::header::CONTENT_TYPE, "application/octet-stream")
                .body(Full::new(body.clone()))
                .expect("request");
            let t0 = Instant::now();
            let sent = tokio::time::timeout_at(w.end.into(), async {
                let resp = tx.send_request(req).await?;
                let status = resp.status();
                resp.into_body().collect().await?;
                Ok::<StatusCode, hyper::Error>(status)
            })
            .await;
            let t1 = Instant::now();
            let counted = t1 >= w.measure_from && t1 < w.end;
            match sent {
                Err(_) => break 'connect,
                Ok(Err(_)) => {
                    if counted {
                        r.errors += 1;
                    }
                    continue 'connect;
                }
                Ok(Ok(status)) => {
                    if counted {
                        if status.is_success() {
                            r.ok += 1;
                        } else {
                            r.non2xx += 1;
                        }
                        *r.statuses.entry(status.as_u16()).or_default() += 1;
                        let us = u32::try_from((t1 - t0).as_micros()).unwrap_or(u32::MAX);
                        r.lat_us.push(us);
                    }
                }
            }
        }
    }
    r
}

/// Holds `n` keep-alive connections open after one request each, until released.
fn hold_idle_connections(
    port: u16,
    n: usize,
    body: Bytes,
) -> (
    std::sync::mpsc::Receiver<usize>,
    tokio::sync::oneshot::Sender<()>,
    std::thread::JoinHandle<()>,
) {
    let (ready_tx, ready_rx) = std::sync::mpsc::channel();
    let (release_tx, release_rx) = tokio::sync::oneshot::channel::<()>();
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_current_thread()
            .enable_all()
            .build()
            .expect("runtime");
        rt.block_on(async move {
            let host = format!("127.0.0.1:{port}");
            let mut held = Vec::with_capacity(n);
            let mut opened = 0;
            for chunk in 0..n.div_ceil(100) {
                let mut set = tokio::task::JoinSet::new();
                for _ in (chunk * 100)..((chunk + 1) * 100).min(n) {
                    let body = body.clone();
                    let host = host.clone();
                    set.spawn(async move {
                        let stream = tokio::net::TcpStream::connect(("127.0.0.1", port))
                            .await
                            .ok()?;
                        let (mut tx, conn) =
                            hyper::client::conn::http1::handshake(TokioIo::new(stream))
                                .await
                                .ok()?;
                        tokio::spawn(conn);
                        let req = Request::post(PATH)
                            .header(http::header::HOST, host.as_str())
                            .body(Full::new(body))
                            .ok()?;
                        let resp = tx.send_request(req).await.ok()?;
                        resp.into_body().collect().await.ok()?;
                        Some(tx)
                    });
                }
                while let Some(r) = set.join_next().await {
                    if let Ok(Some(tx)) = r {
                        held.push(tx);
                        opened += 1;
                    }
                }
            }
            let _ = ready_tx.send(opened);
            let _ = release_rx.await;
            drop(held);
        });
    });
    (ready_rx, release_tx, thread)
}

// ---------------------------------------------------------------- proxies

#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Mode {
    Single,
    ActiveActive,
}

struct ForkdOpts<'a> {
    mode: Mode,
    primary: u16,
    backup: Option<u16>,
    max_inflight: &'a str,
    drain_concurrency: usize,
    timeout: &'a str,
}

struct Proxy {
    proc_: Proc,
    port: u16,
    admin: Option<u16>,
}

// ---------------------------------------------------------------- bench

/// One measured row.
#[derive(Debug, Clone, Default)]
struct Row {
    name: String,
    rps: f64,
    mib_s: f64,
    p50: f64,
    p99: f64,
    p999: f64,
    cpu_us_per_req: f64,
    cpu_pct: f64,
    proxy_core_busy: f64,
    load_core_busy: f64,
    rss_mib: f64,
    non2xx: u64,
    errors: u64,
    throttled: Option<(u64, u64)>,
}

struct Bench {
    s: Settings,
    proxy_core: Option<usize>,
    load_core: Option<usize>,
    cap: Option<Cap>,
    tmp: PathBuf,
    ticks: f64,
    nginx: Option<String>,
    body: Bytes,
}

impl Bench {
    fn new(s: Settings, cores: Vec<usize>) -> Bench {
        let pinned = cores.len() >= 2 && have("taskset");
        let (proxy_core, load_core) = if pinned {
            (Some(cores[0]), Some(cores[cores.len() - 1]))
        } else {
            (None, None)
        };
        let cap = if !s.cap {
            println!("cap: off (FORKD_E2E_NO_CAP)");
            None
        } else if !pinned {
            println!("cap: off (fewer than 2 cores or no taskset; running unpinned, uncapped)");
            None
        } else {
            match Cap::setup() {
                Ok(c) => {
                    println!("cap: {}", c.describe());
                    Some(c)
                }
                Err(e) => {
                    println!("cap: cgroups not writable ({e}); running pinned and uncapped");
                    None
                }
            }
        };
        let tmp = PathBuf::from(TMP_ROOT).join(format!("e2e-{}", std::process::id()));
        std::fs::create_dir_all(&tmp).expect("temp dir");
        let nginx = ["nginx", "/usr/sbin/nginx"]
            .into_iter()
            .find(|p| {
                Command::new(p)
                    .arg("-v")
                    .stdout(Stdio::null())
                    .stderr(Stdio::null())
                    .status()
                    .is_ok()
            })
            .map(String::from);
        let body = Bytes::from(
            (0..s.body)
                .map(|i| b"0123456789abcdef"[i % 16])
                .collect::<Vec<u8>>(),
        );
        Bench {
            proxy_core,
            load_core,
            cap,
            tmp,
            ticks: clock_ticks_per_second(),
            nginx,
            body,
            s,
        }
    }

    fn run(self) {
        let s = &self.s;
        println!(
            "e2e: K={} connections, S={} B bodies, T={} s per row, {} round(s), warm-up {:?}",
            s.conns, s.body, s.seconds, s.rounds, s.warmup
        );
        println!(
            "cores: proxy on {}, load generator + sinks on {}; forkd {}",
            self.proxy_core.map_or("any".into(), |c| c.to_string()),
            self.load_core.map_or("any".into(), |c| c.to_string()),
            FORKD
        );
        println!("load: {}", uptime());
        if self.nginx.is_none() {
            println!("SKIP nginx rows: nginx is not installed (apt-get install -y nginx-light)");
        }
        let (sink_a, port_a) = start_sink(0, false);
        let (sink_b, port_b) = start_sink(0, false);
        if s.wants("compare") {
            self.compare(port_a, port_b);
        }
        if s.wants("spool") {
            self.spool_and_drain(port_a);
        }
        if s.wants("idle") {
            self.idle(port_a, port_b);
        }
        if s.wants("stall") {
            self.stalled();
        }
        drop(sink_a);
        drop(sink_b);
        println!("load: {}", uptime());
        if !s.keep {
            let _ = std::fs::remove_dir_all(&self.tmp);
        } else {
            println!("kept {}", self.tmp.display());
        }
    }

    // ------------------------------------------------------------ launching

    /// Starts `program args` on the proxy core, in the cap cgroup when `capped`.
    fn spawn_proxy(
        &self,
        name: &str,
        program: &str,
        args: &[String],
        env: &[(&str, String)],
        capped: bool,
        log: &Path,
    ) -> Proc {
        let mut cmd;
        let cap = self.cap.as_ref().filter(|_| capped);
        match (cap, self.proxy_core) {
            (Some(cap), Some(core)) => {
                // Join the cgroup before exec, so every thread and child is in it.
                cmd = Command::new("sh");
                cmd.arg("-c")
                    .arg(r#"echo $$ > "$1" && shift && core="$1" && shift && exec taskset -c "$core" "$@""#)
                    .arg("sh")
                    .arg(cap.procs())
                    .arg(core.to_string())
                    .arg(program)
                    .args(args);
            }
            (None, Some(core)) => {
                cmd = Command::new("taskset");
                cmd.arg("-c").arg(core.to_string()).arg(program).args(args);
            }
            _ => {
                cmd = Command::new(program);
                cmd.args(args);
            }
        }
        for (k, v) in env {
            cmd.env(k, v);
        }
        let logf = std::fs::File::create(log).expect("log file");
        let child = cmd
            .stdin(Stdio::null())
            .stdout(logf.try_clone().expect("log"))
            .stderr(logf)
            .spawn()
            .unwrap_or_else(|e| panic!("cannot start {program}: {e}"));
        Proc {
            name: name.to_owned(),
            child,
        }
    }

    fn forkd(&self, name: &str, o: &ForkdOpts<'_>, capped: bool) -> Proxy {
        self.forkd_bin(FORKD, name, o, capped)
    }

    fn forkd_bin(&self, bin: &str, name: &str, o: &ForkdOpts<'_>, capped: bool) -> Proxy {
        let dir = self.tmp.join(format!(
            "{name}-{}",
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        std::fs::create_dir_all(&dir).expect("forkd dir");
        let port = free_port();
        let admin = free_port();
        let mode = match o.mode {
            Mode::Single => "active-passive",
            Mode::ActiveActive => "active-active",
        };
        let mut toml = format!(
            r#"[server]
listen = "127.0.0.1:{port}"
max_inflight_bytes = "{inflight}"
max_body_size = "16MiB"

[admin]
listen = "127.0.0.1:{admin}"

[log]
level = "info"

[routing]
mode = "{mode}"
active = "primary"

[targets.primary]
url = "http://127.0.0.1:{primary}"
timeout = "{timeout}"
"#,
            inflight = o.max_inflight,
            primary = o.primary,
            timeout = o.timeout,
        );
        if let Some(b) = o.backup {
            toml.push_str(&format!(
                "\n[targets.backup]\nurl = \"http://127.0.0.1:{b}\"\ntimeout = \"{}\"\n",
                o.timeout
            ));
        }
        toml.push_str(&format!(
            r#"
[buffer]
dir = "{spool}"
fsync = "always"
drain_concurrency = {dc}

[retry]
initial_backoff = "50ms"
max_backoff = "250ms"
"#,
            spool = dir.join("spool").display(),
            dc = o.drain_concurrency,
        ));
        let conf = dir.join("forkd.toml");
        std::fs::write(&conf, toml).expect("write forkd config");
        let mut env = Vec::new();
        if let Some(n) = self.s.forkd_workers {
            env.push(("TOKIO_WORKER_THREADS", n.to_string()));
        }
        let mut proc_ = self.spawn_proxy(
            name,
            bin,
            &["run".into(), "--config".into(), conf.display().to_string()],
            &env,
            capped,
            &dir.join("forkd.log"),
        );
        wait_port(port, &mut proc_).unwrap_or_else(|e| {
            panic!(
                "{e}; log: {}",
                std::fs::read_to_string(dir.join("forkd.log")).unwrap_or_default()
            )
        });
        wait_port(admin, &mut proc_).expect("forkd admin");
        Proxy {
            proc_,
            port,
            admin: Some(admin),
        }
    }

    fn nginx(&self, name: &str, template: &str, primary: u16, backup: u16) -> Option<Proxy> {
        let nginx = self.nginx.as_ref()?;
        let dir = self.tmp.join(name);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("nginx dir");
        let port = free_port();
        let conf = template
            .replace("{{PREFIX}}", &dir.display().to_string())
            .replace("{{LISTEN}}", &port.to_string())
            .replace("{{PRIMARY}}", &primary.to_string())
            .replace("{{BACKUP}}", &backup.to_string());
        let path = dir.join("nginx.conf");
        std::fs::write(&path, conf).expect("nginx conf");
        let mut proc_ = self.spawn_proxy(
            name,
            nginx,
            &[
                "-p".into(),
                dir.display().to_string(),
                "-c".into(),
                path.display().to_string(),
                "-e".into(),
                "stderr".into(),
            ],
            &[],
            true,
            &dir.join("nginx.log"),
        );
        if let Err(e) = wait_port(port, &mut proc_) {
            println!(
                "SKIP {name}: {e}: {}",
                std::fs::read_to_string(dir.join("nginx.log")).unwrap_or_default()
            );
            return None;
        }
        Some(Proxy {
            proc_,
            port,
            admin: None,
        })
    }

    // ------------------------------------------------------------ measuring

    /// Runs the load against `port` and measures `pid` (the proxy, or the sink
    /// for the direct row) over the window.
    fn measure(&self, name: &str, port: u16, pid: u32, conns: usize) -> Row {
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let w = Window {
            measure_from: start + self.s.warmup,
            end: start + self.s.warmup + Duration::from_secs(self.s.seconds),
            stop,
            pace: None,
        };
        let body = self.body.clone();
        let w2 = w.clone();
        let load = std::thread::spawn(move || run_load(port, conns, body, w2));
        sleep_until(w.measure_from);
        let (t0, j0, c0) = (tree_ticks(pid), core_jiffies(), self.throttling());
        let perf = self.perf_record(name, pid);
        sleep_until(w.end);
        let (t1, j1, c1) = (tree_ticks(pid), core_jiffies(), self.throttling());
        let mut stat_file = None;
        if let Some((mut perf, file, stat)) = perf {
            let _ = perf.wait();
            stat_file = stat.then_some(file);
        }
        let rss = tree_status_kib(pid, "VmHWM:");
        let r = load.join().expect("load thread");
        let row = self.row(name, &r, t1 - t0, (&j0, &j1), rss, c0.zip(c1));
        if let Some(file) = stat_file {
            let text = std::fs::read_to_string(file).unwrap_or_default();
            let answered = (r.ok + r.non2xx).max(1) as f64;
            let per: Vec<String> = text
                .lines()
                .filter_map(|l| {
                    let f: Vec<&str> = l.split(',').collect();
                    let n: f64 = f.first()?.trim().parse().ok()?;
                    let ev = f.get(2)?.trim_start_matches("syscalls:sys_enter_");
                    Some(format!("{ev} {:.2}", n / answered))
                })
                .collect();
            println!("  per request: {}", per.join(", "));
        }
        row
    }

    /// With FORKD_E2E_PERF set: `perf record -g` of the process over the window,
    /// saved as `<tmp>/perf-<row>.data` (the temp dir is kept).
    /// With FORKD_E2E_PERF=stat: syscall counts over the window, printed per request.
    /// With FORKD_E2E_PERF=sched: scheduler and spool system-call tracepoints.
    fn perf_record(&self, name: &str, pid: u32) -> Option<(Child, PathBuf, bool)> {
        let how = std::env::var("FORKD_E2E_PERF").ok()?;
        let stem = name.replace([' ', '(', ')', ','], "_");
        let mut cmd = Command::new("perf");
        let stat = how == "stat";
        let file = if stat {
            let file = self.tmp.join(format!("perf-stat-{stem}.csv"));
            cmd.args(["stat", "-x", ",", "-o"]).arg(&file).args([
                "-e",
                "raw_syscalls:sys_enter,syscalls:sys_enter_read,syscalls:sys_enter_recvfrom,\
                 syscalls:sys_enter_write,syscalls:sys_enter_writev,syscalls:sys_enter_sendto,\
                 syscalls:sys_enter_epoll_wait,syscalls:sys_enter_futex,syscalls:sys_enter_getrandom,\
                 context-switches",
            ]);
            file
        } else {
            let file = self.tmp.join(format!("perf-{stem}.data"));
            println!("  perf record -> {}", file.display());
            if how == "dwarf" {
                cmd.args(["record", "-F", "999", "--call-graph", "dwarf,32768", "-o"]);
            } else if how == "sched" {
                // Who runs when: context switches, wake-ups and the spool's
                // write and sync system calls, for per-cycle analysis with
                // `perf script`.
                cmd.args([
                    "record",
                    "-e",
                    "sched:sched_switch,sched:sched_wakeup,\
                     syscalls:sys_enter_fdatasync,syscalls:sys_exit_fdatasync,\
                     syscalls:sys_enter_writev,syscalls:sys_exit_writev,\
                     syscalls:sys_enter_futex,syscalls:sys_exit_futex",
                    "-o",
                ]);
            } else {
                cmd.args(["record", "-F", "2999", "-g", "-o"]);
            }
            cmd.arg(&file);
            file
        };
        let pids: Vec<String> = process_tree(pid).iter().map(u32::to_string).collect();
        cmd.args(["-p", &pids.join(","), "--", "sleep"])
            .arg(self.s.seconds.to_string())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()
            .map(|c| (c, file, stat))
    }

    fn throttling(&self) -> Option<(u64, u64)> {
        self.cap.as_ref().map(Cap::throttling)
    }

    fn row(
        &self,
        name: &str,
        r: &LoadResult,
        ticks: u64,
        jiffies: (&Jiffies, &Jiffies),
        rss_kib: u64,
        throttle: Option<((u64, u64), (u64, u64))>,
    ) -> Row {
        let secs = r.window.as_secs_f64();
        let answered = (r.ok + r.non2xx) as f64;
        let cpu_s = ticks as f64 / self.ticks;
        let busy = |core: Option<usize>| {
            core.and_then(|c| {
                let (b0, t0) = jiffies.0.get(&c)?;
                let (b1, t1) = jiffies.1.get(&c)?;
                Some(100.0 * (b1 - b0) as f64 / ((t1 - t0).max(1)) as f64)
            })
            .unwrap_or(f64::NAN)
        };
        Row {
            name: name.to_owned(),
            rps: answered / secs,
            mib_s: r.ok as f64 * self.s.body as f64 / MIB / secs,
            p50: r.percentile_ms(0.5),
            p99: r.percentile_ms(0.99),
            p999: r.percentile_ms(0.999),
            cpu_us_per_req: if answered > 0.0 {
                cpu_s * 1e6 / answered
            } else {
                f64::NAN
            },
            cpu_pct: 100.0 * cpu_s / secs,
            proxy_core_busy: busy(self.proxy_core),
            load_core_busy: busy(self.load_core),
            rss_mib: rss_kib as f64 / 1024.0,
            non2xx: r.non2xx,
            errors: r.errors,
            throttled: throttle.map(|((p0, t0), (p1, t1))| (p1 - p0, t1 - t0)),
        }
    }

    // ------------------------------------------------------------ row groups

    fn compare(&self, a: u16, b: u16) {
        println!();
        println!("## Comparison rows (proxy capped: {})", self.cap.is_some());
        let single = ForkdOpts {
            mode: Mode::Single,
            primary: a,
            backup: None,
            max_inflight: "256MiB",
            drain_concurrency: 1,
            timeout: "10s",
        };
        let aa = ForkdOpts {
            mode: Mode::ActiveActive,
            backup: Some(b),
            ..single
        };
        let mut rounds: Vec<BTreeMap<&str, Row>> = Vec::new();
        for round in 0..self.s.rounds {
            println!("round {} of {} ({})", round + 1, self.s.rounds, uptime());
            let mut rows = BTreeMap::new();
            // Alternate the order so that drifting noise hits both sides.
            let mut order = vec![
                "direct",
                "forkd-single",
                "nginx-proxy",
                "forkd-aa",
                "nginx-mirror",
            ];
            if self.s.baseline.is_some() {
                order.extend(["base-single", "base-aa"]);
            }
            if round % 2 == 1 {
                order.reverse();
            }
            for what in order {
                let row = match what {
                    "direct" => {
                        let (sink, port) = start_sink(0, false);
                        let r = self.measure("direct (sink)", port, sink.pid(), self.s.conns);
                        drop(sink);
                        Some(r)
                    }
                    "forkd-single" => {
                        let p = self.forkd("forkd-single", &single, true);
                        Some(self.measure("forkd single", p.port, p.proc_.pid(), self.s.conns))
                    }
                    "base-single" | "base-aa" => self.s.baseline.as_deref().map(|bin| {
                        let (opts, label) = if what == "base-aa" {
                            (&aa, "baseline forkd active-active")
                        } else {
                            (&single, "baseline forkd single")
                        };
                        let p = self.forkd_bin(bin, what, opts, true);
                        self.measure(label, p.port, p.proc_.pid(), self.s.conns)
                    }),
                    "forkd-aa" => {
                        let p = self.forkd("forkd-aa", &aa, true);
                        Some(self.measure(
                            "forkd active-active",
                            p.port,
                            p.proc_.pid(),
                            self.s.conns,
                        ))
                    }
                    "nginx-proxy" => self
                        .nginx("nginx-proxy", NGINX_PROXY_CONF, a, b)
                        .map(|p| self.measure("nginx proxy", p.port, p.proc_.pid(), self.s.conns)),
                    "nginx-mirror" => self
                        .nginx("nginx-mirror", NGINX_MIRROR_CONF, a, b)
                        .map(|p| self.measure("nginx mirror", p.port, p.proc_.pid(), self.s.conns)),
                    _ => None,
                };
                if let Some(r) = row {
                    print_row(&r);
                    rows.insert(what, r);
                }
            }
            let ratio =
                |x: &str, y: &str, f: fn(&Row) -> f64| Some(f(rows.get(x)?) / f(rows.get(y)?));
            if let (Some(rq), Some(cpu)) = (
                ratio("forkd-aa", "nginx-mirror", |r| r.rps),
                ratio("forkd-aa", "nginx-mirror", |r| r.cpu_us_per_req),
            ) {
                println!(
                    "  ratio forkd-aa / nginx-mirror: req/s {rq:.2}x, CPU per request {cpu:.2}x"
                );
            }
            if let (Some(rq), Some(cpu)) = (
                ratio("forkd-single", "nginx-proxy", |r| r.rps),
                ratio("forkd-single", "nginx-proxy", |r| r.cpu_us_per_req),
            ) {
                println!(
                    "  ratio forkd-single / nginx-proxy: req/s {rq:.2}x, CPU per request {cpu:.2}x"
                );
            }
            if let Some(cpu) = ratio("forkd-aa", "nginx-proxy", |r| r.cpu_us_per_req) {
                println!("  ratio forkd-aa CPU per request / nginx-proxy: {cpu:.2}x");
            }
            rounds.push(rows);
        }
        self.summarize(&rounds);
    }

    fn summarize(&self, rounds: &[BTreeMap<&str, Row>]) {
        println!();
        println!("### Median over {} round(s)", rounds.len());
        println!();
        println!("{}", ROW_HEADER);
        println!("{}", ROW_RULE);
        for what in [
            "direct",
            "forkd-single",
            "nginx-proxy",
            "forkd-aa",
            "nginx-mirror",
            "base-single",
            "base-aa",
        ] {
            let rows: Vec<&Row> = rounds.iter().filter_map(|r| r.get(what)).collect();
            if rows.is_empty() {
                continue;
            }
            let med = |f: fn(&Row) -> f64| median(rows.iter().map(|r| f(r)).collect());
            let row = Row {
                name: rows[0].name.clone(),
                rps: med(|r| r.rps),
                mib_s: med(|r| r.mib_s),
                p50: med(|r| r.p50),
                p99: med(|r| r.p99),
                p999: med(|r| r.p999),
                cpu_us_per_req: med(|r| r.cpu_us_per_req),
                cpu_pct: med(|r| r.cpu_pct),
                proxy_core_busy: med(|r| r.proxy_core_busy),
                load_core_busy: med(|r| r.load_core_busy),
                rss_mib: med(|r| r.rss_mib),
                non2xx: rows.iter().map(|r| r.non2xx).sum(),
                errors: rows.iter().map(|r| r.errors).sum(),
                throttled: None,
            };
            println!("{}", table_line(&row));
        }
        let ratios = |x: &str, y: &str, f: fn(&Row) -> f64| -> Vec<f64> {
            rounds
                .iter()
                .filter_map(|r| Some(f(r.get(x)?) / f(r.get(y)?)))
                .collect()
        };
        println!();
        let rps: fn(&Row) -> f64 = |r| r.rps;
        let cpu: fn(&Row) -> f64 = |r| r.cpu_us_per_req;
        // (row, row it is compared with, the measure, its name, the target)
        for (x, y, f, what, target) in [
            ("forkd-aa", "nginx-mirror", rps, "req/s", ">= 1.50"),
            (
                "forkd-aa",
                "nginx-mirror",
                cpu,
                "CPU per request",
                "<= 0.67",
            ),
            ("forkd-single", "nginx-proxy", rps, "req/s", ">= 1.00"),
            (
                "forkd-single",
                "nginx-proxy",
                cpu,
                "CPU per request",
                "(info)",
            ),
            ("forkd-aa", "nginx-proxy", cpu, "CPU per request", "(info)"),
            ("forkd-single", "direct", rps, "req/s", "(info)"),
            (
                "forkd-aa",
                "base-aa",
                cpu,
                "CPU per request",
                "(before/after)",
            ),
            (
                "forkd-single",
                "base-single",
                cpu,
                "CPU per request",
                "(before/after)",
            ),
        ] {
            let v = ratios(x, y, f);
            if v.is_empty() {
                continue;
            }
            let label = format!("{x} / {} {what}", y.replace("base-", "baseline-"));
            let per_round: Vec<String> = v.iter().map(|x| format!("{x:.2}")).collect();
            println!(
                "ratio {label}: median {:.2} (rounds: {}) target {target}",
                median(v.clone()),
                per_round.join(", ")
            );
        }
    }

    /// Active-active with the backup down (spooling under fsync = "always"),
    /// fio with the same write pattern before and after, then the drain when
    /// the backup returns while live load continues.
    fn spool_and_drain(&self, a: u16) {
        println!();
        println!(
            "## Spooling and drain (forkd {})",
            if self.s.spool_cap && self.cap.is_some() {
                "capped"
            } else {
                "pinned, uncapped: the disk and the drain are what is measured"
            }
        );
        let down_port = free_port();
        let o = ForkdOpts {
            mode: Mode::ActiveActive,
            primary: a,
            backup: Some(down_port),
            max_inflight: "256MiB",
            drain_concurrency: self.s.drain_concurrency,
            timeout: "10s",
        };
        let p = self.forkd("forkd-spool", &o, self.s.spool_cap);
        let admin = p.admin.expect("admin port");
        let pid = p.proc_.pid();
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let outage = Duration::from_secs(self.s.seconds);
        let w = Window {
            measure_from: start + self.s.warmup,
            end: start + self.s.warmup + outage,
            stop: stop.clone(),
            pace: None,
        };
        // Phase 1: the measured outage window.
        let body = self.body.clone();
        let w1 = w.clone();
        let conns = self.s.conns;
        let load = std::thread::spawn(move || run_load(p.port, conns, body, w1));
        sleep_until(w.measure_from);
        let m0 = http_get(admin, "/metrics").unwrap_or_default();
        let (t0, j0) = (tree_ticks(pid), core_jiffies());
        let perf = PerfCount::start(pid, outage);
        let record = self.perf_record("forkd-spool", pid);
        sleep_until(w.end);
        if let Some((mut c, _, _)) = record {
            let _ = c.wait();
        }
        let (t1, j1) = (tree_ticks(pid), core_jiffies());
        let m1 = http_get(admin, "/metrics").unwrap_or_default();
        let r = load.join().expect("load");
        let syscalls = perf.and_then(PerfCount::finish);
        let rss = tree_status_kib(pid, "VmHWM:");
        let row = self.row(
            "forkd aa, backup down (spool, fsync=always)",
            &r,
            t1 - t0,
            (&j0, &j1),
            rss,
            None,
        );
        print_row(&row);
        let status: serde_json::Value = http_get(admin, "/status")
            .and_then(|s| serde_json::from_str(&s).ok())
            .unwrap_or_default();
        let spooled = metric(
            &m1,
            "forkd_target_requests_total{result=\"spooled\",target=\"backup\"}",
        ) - metric(
            &m0,
            "forkd_target_requests_total{result=\"spooled\",target=\"backup\"}",
        );
        let backlog_bytes = status["targets"]["backup"]["buffer_bytes"]
            .as_u64()
            .unwrap_or(0);
        let backlog_records = status["targets"]["backup"]["buffer_records"]
            .as_u64()
            .unwrap_or(0);
        let framed = if backlog_records > 0 {
            backlog_bytes as f64 / backlog_records as f64
        } else {
            f64::NAN
        };
        let spool_mib_s = spooled * framed / MIB / r.window.as_secs_f64();
        println!(
            "  spooled {spooled:.0} records in the window ({framed:.0} B framed each): {spool_mib_s:.1} MiB/s framed to the backup's spool"
        );
        let batch_bytes = match syscalls {
            Some((fdatasync, pwrite)) if fdatasync > 0 => {
                let per_sync = spooled / fdatasync as f64;
                println!(
                    "  perf: {fdatasync} fdatasync, {pwrite} pwrite64 in the window: {per_sync:.1} records per fdatasync"
                );
                (per_sync * framed).round() as u64
            }
            _ => {
                let guess = (self.s.conns as f64 / 2.0).max(1.0);
                println!(
                    "  perf tracepoints unavailable: assuming {guess:.0} records per fdatasync (K/2, as measured in the spool bench)"
                );
                (guess * framed).round() as u64
            }
        };
        let fio_first = self.fio(batch_bytes, 1);
        let fio_writers = self.fio(self.s.body as u64, self.s.conns);
        let spool_mib_s_for_ratio = spool_mib_s;
        // Phase 2: the backup returns; live load continues until the backlog is gone.
        let drain_load_stop = Arc::new(AtomicBool::new(false));
        let w2 = Window {
            measure_from: Instant::now(),
            end: Instant::now() + DRAIN_LIMIT + Duration::from_secs(5),
            stop: drain_load_stop.clone(),
            pace: (self.s.drain_live_rps > 0)
                .then(|| Duration::from_secs_f64(conns as f64 / self.s.drain_live_rps as f64)),
        };
        let body = self.body.clone();
        let w2c = w2.clone();
        let port = p.port;
        let load = std::thread::spawn(move || run_load(port, conns, body, w2c));
        let before = status["targets"]["backup"]["buffer_records"]
            .as_u64()
            .unwrap_or(0);
        let (sink_b, _) = start_sink(down_port, false);
        let backup_up_at = Instant::now();
        let mut first: Option<(Instant, String)> = None;
        let mut done: Option<(Instant, String)> = None;
        let (tj0, jj0) = (tree_ticks(pid), core_jiffies());
        while backup_up_at.elapsed() < DRAIN_LIMIT {
            let st: serde_json::Value = http_get(admin, "/status")
                .and_then(|s| serde_json::from_str(&s).ok())
                .unwrap_or_default();
            let state = st["targets"]["backup"]["state"].as_str().unwrap_or("");
            let records = st["targets"]["backup"]["buffer_records"]
                .as_u64()
                .unwrap_or(u64::MAX);
            if first.is_none() && state != "down" {
                first = Some((
                    Instant::now(),
                    http_get(admin, "/metrics").unwrap_or_default(),
                ));
            }
            if first.is_some() && (records == 0 || state == "up") {
                done = Some((
                    Instant::now(),
                    http_get(admin, "/metrics").unwrap_or_default(),
                ));
                break;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
        let (tj1, jj1) = (tree_ticks(pid), core_jiffies());
        drain_load_stop.store(true, Ordering::Relaxed);
        let live = load.join().expect("load");
        match (first, done) {
            (Some((t_a, ma)), Some((t_b, mb))) => {
                let secs = (t_b - t_a).as_secs_f64().max(1e-3);
                let bytes = metric(&mb, "forkd_target_delivered_bytes_total{target=\"backup\"}")
                    - metric(&ma, "forkd_target_delivered_bytes_total{target=\"backup\"}");
                let replays = metric(
                    &mb,
                    "forkd_target_latency_seconds_count{path=\"replay\",target=\"backup\"}",
                ) - metric(
                    &ma,
                    "forkd_target_latency_seconds_count{path=\"replay\",target=\"backup\"}",
                );
                let whole = (t_b - backup_up_at).as_secs_f64();
                let live_secs = (Instant::now() - w2.measure_from).as_secs_f64();
                let cpu = (tj1 - tj0) as f64 / self.ticks;
                let busy = |core: Option<usize>| {
                    core.and_then(|c| {
                        let (b0, t0) = jj0.get(&c)?;
                        let (b1, t1) = jj1.get(&c)?;
                        Some(100.0 * (b1 - b0) as f64 / ((t1 - t0).max(1)) as f64)
                    })
                    .unwrap_or(f64::NAN)
                };
                println!(
                    "drain: backlog of {before} records emptied in {secs:.2} s after the first delivery ({whole:.2} s after the backup listened): \
                     {:.0} records/s, {:.1} MiB/s of bodies replayed (target >= 200 MiB/s); drain_concurrency = {}",
                    replays / secs,
                    bytes / MIB / secs,
                    self.s.drain_concurrency
                );
                println!(
                    "  live load meanwhile ({}): {:.0} req/s, p99 {:.2} ms, {} non-2xx; forkd CPU {:.0} % of a core; cores busy {:.0} % / {:.0} %",
                    if self.s.drain_live_rps > 0 {
                        format!("paced at {} req/s", self.s.drain_live_rps)
                    } else {
                        "closed loop".to_owned()
                    },
                    (live.ok + live.non2xx) as f64 / live_secs,
                    live.percentile_ms(0.99),
                    live.non2xx,
                    100.0 * cpu / live_secs,
                    busy(self.proxy_core),
                    busy(self.load_core)
                );
            }
            _ => println!("drain: did not finish within {DRAIN_LIMIT:?}"),
        }
        drop(sink_b);
        drop(p);
        let fio_second = self.fio(batch_bytes, 1);
        if let Some(fio) = fio_writers {
            println!(
                "fio, the same write pattern as the clients make it ({} writers of {} B records, fdatasync after each, one file each, {} s): {fio:.1} MiB/s",
                self.s.conns, self.s.body, self.s.seconds
            );
            println!(
                "ratio spool / fio ({} durable {} B appenders): {:.2} (spool {spool_mib_s_for_ratio:.1} MiB/s framed) target >= 0.80",
                self.s.conns,
                self.s.body,
                spool_mib_s_for_ratio / fio
            );
        }
        match (fio_first, fio_second) {
            (Some(a), Some(b)) => {
                let fio = (a + b) / 2.0;
                println!(
                    "fio, the same bytes per fdatasync as the spool's group commit (one writer, sequential {:.0} KiB writes, fdatasync after each, {} s): {fio:.1} MiB/s (runs right after the spool row and after the drain: {a:.1}, {b:.1})",
                    batch_bytes as f64 / 1024.0,
                    self.s.seconds
                );
                println!(
                    "ratio spool / fio (same bytes per fdatasync; forkd shares its one core with the request path, fio has it alone): {:.2} (spool {spool_mib_s_for_ratio:.1} MiB/s framed)",
                    spool_mib_s_for_ratio / fio
                );
            }
            _ => println!("SKIP fio comparison: fio is not installed"),
        }
    }

    /// fio bandwidth in MiB/s: `jobs` writers (one file each), sequential
    /// writes of `bs` with fdatasync after each, on the filesystem of the
    /// spool, pinned where the proxy runs, for T seconds.
    fn fio(&self, bs: u64, jobs: usize) -> Option<f64> {
        if !have("fio") || bs == 0 {
            return None;
        }
        let dir = self.tmp.join("fio");
        std::fs::create_dir_all(&dir).ok()?;
        let mut cmd = Command::new("fio");
        if let Some(core) = self.proxy_core {
            cmd = Command::new("taskset");
            cmd.arg("-c").arg(core.to_string()).arg("fio");
        }
        let out = cmd
            .args([
                "--name=spool-pattern",
                &format!("--directory={}", dir.display()),
                "--rw=write",
                &format!("--bs={bs}"),
                &format!("--size={}", (8u64 << 30) / jobs.max(1) as u64),
                &format!("--numjobs={}", jobs.max(1)),
                "--group_reporting",
                "--fdatasync=1",
                "--ioengine=psync",
                "--fallocate=none",
                "--unlink=1",
                &format!("--runtime={}", self.s.seconds),
                "--output-format=json",
            ])
            .output()
            .ok()?;
        let v: serde_json::Value = serde_json::from_slice(&out.stdout).ok()?;
        let bw = v["jobs"][0]["write"]["bw_bytes"].as_f64()?;
        Some(bw / MIB)
    }

    /// RSS with 1,000 idle keep-alive connections (after one request each).
    fn idle(&self, a: u16, b: u16) {
        println!();
        println!("## RSS with 1,000 idle keep-alive connections (after one request each)");
        let aa = ForkdOpts {
            mode: Mode::ActiveActive,
            primary: a,
            backup: Some(b),
            max_inflight: "256MiB",
            drain_concurrency: 1,
            timeout: "10s",
        };
        let p = self.forkd("forkd-idle", &aa, false);
        self.idle_one("forkd active-active", &p, "target <= 64 MiB");
        drop(p);
        if let Some(p) = self.nginx("nginx-idle", NGINX_MIRROR_CONF, a, b) {
            self.idle_one("nginx mirror", &p, "(info)");
        }
    }

    fn idle_one(&self, name: &str, p: &Proxy, target: &str) {
        let pid = p.proc_.pid();
        let before = tree_status_kib(pid, "VmRSS:");
        let (ready, release, thread) = hold_idle_connections(p.port, 1000, self.body.clone());
        let opened = ready.recv_timeout(Duration::from_secs(60)).unwrap_or(0);
        std::thread::sleep(Duration::from_secs(1));
        let rss = tree_status_kib(pid, "VmRSS:");
        let hwm = tree_status_kib(pid, "VmHWM:");
        let _ = release.send(());
        let _ = thread.join();
        println!(
            "{name}: {opened} connections open: RSS {:.1} MiB (before {:.1} MiB), peak {:.1} MiB; {target}",
            rss as f64 / 1024.0,
            before as f64 / 1024.0,
            hwm as f64 / 1024.0
        );
    }

    /// RSS with a target that takes requests and never answers: with the
    /// default timeout (10 s, longer than the run: every body waits in
    /// memory) and with 2 s (copies time out and go to the spool while the
    /// load continues).
    fn stalled(&self) {
        for timeout in ["10s", "2s"] {
            self.stalled_one(timeout);
        }
    }

    fn stalled_one(&self, timeout: &str) {
        println!();
        let body_len = 1 << 20;
        let conns = 256;
        let inflight_mib = 64;
        println!(
            "## Stalled target: forkd single target that never answers, max_inflight_bytes = {inflight_mib} MiB, \
             {conns} connections x {} KiB bodies, target timeout {timeout}",
            body_len / 1024
        );
        let (stall, port) = start_sink(0, true);
        let o = ForkdOpts {
            mode: Mode::Single,
            primary: port,
            backup: None,
            max_inflight: "64MiB",
            drain_concurrency: 1,
            timeout,
        };
        let p = self.forkd("forkd-stall", &o, false);
        let pid = p.proc_.pid();
        let stop = Arc::new(AtomicBool::new(false));
        let start = Instant::now();
        let secs = self.s.seconds.max(8);
        let w = Window {
            measure_from: start,
            end: start + Duration::from_secs(secs),
            stop,
            pace: None,
        };
        let body = Bytes::from(vec![b'x'; body_len]);
        let load = std::thread::spawn(move || run_load(p.port, conns, body, w));
        let mut peak_inflight: f64 = 0.0;
        let mut timeline = Vec::new();
        let mut next_mark = Duration::ZERO;
        // Peak RSS while the target stalls: read until half a second before
        // the load ends (when every client goes away at once).
        let mut hwm = 0;
        while start.elapsed() < Duration::from_secs(secs) {
            if start.elapsed() + Duration::from_millis(500) < Duration::from_secs(secs) {
                hwm = tree_status_kib(pid, "VmHWM:");
            }
            if let Some(m) = p.admin.and_then(|a| http_get(a, "/metrics")) {
                let inflight = metric(&m, "forkd_inflight_bytes");
                peak_inflight = peak_inflight.max(inflight);
                if start.elapsed() >= next_mark {
                    timeline.push(format!(
                        "{:.0}s: rss {:.0} MiB, in flight {:.0} MiB",
                        start.elapsed().as_secs_f64(),
                        tree_status_kib(pid, "VmRSS:") as f64 / 1024.0,
                        inflight / MIB
                    ));
                    next_mark += Duration::from_secs(1);
                }
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        println!("  {}", timeline.join("; "));
        if std::env::var_os("FORKD_E2E_SMAPS").is_some() {
            let smaps = std::fs::read_to_string(format!("/proc/{pid}/smaps")).unwrap_or_default();
            let mut maps: Vec<(u64, String)> = Vec::new();
            let mut cur = String::new();
            for line in smaps.lines() {
                if line.contains('-') && !line.starts_with(|c: char| c.is_ascii_uppercase()) {
                    cur = line.to_owned();
                } else if let Some(v) = line.strip_prefix("Rss:") {
                    let kib: u64 = v.trim().trim_end_matches("kB").trim().parse().unwrap_or(0);
                    maps.push((kib, cur.clone()));
                }
            }
            maps.sort_by_key(|m| std::cmp::Reverse(m.0));
            for (kib, m) in maps.iter().take(12) {
                println!("  smaps {kib} KiB {m}");
            }
        }
        let r = load.join().expect("load");
        let hwm_teardown = tree_status_kib(pid, "VmHWM:");
        println!(
            "  peak RSS including the teardown (every client gone at once; bodies already sent are read as budget frees): {:.1} MiB",
            hwm_teardown as f64 / 1024.0
        );
        println!(
            "forkd, stalled target (timeout {timeout}): peak RSS {:.1} MiB (target <= {} MiB = max_inflight_bytes + 64 MiB); \
             peak forkd_inflight_bytes {:.1} MiB; answers in {secs} s: {:?}",
            hwm as f64 / 1024.0,
            inflight_mib + 64,
            peak_inflight / MIB,
            r.statuses
        );
        drop(p);
        drop(stall);
    }
}

/// Counts fdatasync and pwrite64 calls of a process with perf tracepoints.
struct PerfCount {
    child: Child,
    out: PathBuf,
}

impl PerfCount {
    fn start(pid: u32, window: Duration) -> Option<PerfCount> {
        let out = std::env::temp_dir().join(format!("forkd-e2e-perf-{}", std::process::id()));
        let child = Command::new("perf")
            .args([
                "stat",
                "-x",
                ",",
                "-o",
                &out.display().to_string(),
                "-e",
                "syscalls:sys_enter_fdatasync,syscalls:sys_enter_pwrite64",
                "-p",
                &pid.to_string(),
                "--",
                "sleep",
                &format!("{:.3}", window.as_secs_f64()),
            ])
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .ok()?;
        Some(PerfCount { child, out })
    }

    fn finish(mut self) -> Option<(u64, u64)> {
        let status = self.child.wait().ok()?;
        let text = std::fs::read_to_string(&self.out).ok()?;
        let _ = std::fs::remove_file(&self.out);
        if !status.success() {
            return None;
        }
        let count = |ev: &str| {
            text.lines()
                .find(|l| l.contains(ev))
                .and_then(|l| l.split(',').next())
                .and_then(|v| v.trim().parse::<u64>().ok())
        };
        Some((
            count("sys_enter_fdatasync")?,
            count("sys_enter_pwrite64").unwrap_or(0),
        ))
    }
}

const ROW_HEADER: &str = "| row | req/s | MiB/s | p50 ms | p99 ms | p99.9 ms | proxy CPU µs/req | proxy CPU % of a core | proxy core busy % | load core busy % | peak RSS MiB | non-2xx | errors |";
const ROW_RULE: &str = "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|";

fn table_line(r: &Row) -> String {
    format!(
        "| {} | {:.0} | {:.1} | {:.2} | {:.2} | {:.2} | {:.1} | {:.0} | {:.0} | {:.0} | {:.1} | {} | {} |",
        r.name,
        r.rps,
        r.mib_s,
        r.p50,
        r.p99,
        r.p999,
        r.cpu_us_per_req,
        r.cpu_pct,
        r.proxy_core_busy,
        r.load_core_busy,
        r.rss_mib,
        r.non2xx,
        r.errors
    )
}

fn print_row(r: &Row) {
    let throttled = r
        .throttled
        .map(|(p, t)| format!(", cap throttled {t} of {p} periods"))
        .unwrap_or_default();
    println!(
        "  {:<44} {:>8.0} req/s {:>7.1} MiB/s  p50 {:>6.2} p99 {:>7.2} p99.9 {:>7.2} ms  cpu {:>6.1} µs/req ({:>3.0} % of a core)  cores {:>3.0}/{:>3.0} %  rss {:>6.1} MiB  non2xx {} err {}{throttled}",
        r.name,
        r.rps,
        r.mib_s,
        r.p50,
        r.p99,
        r.p999,
        r.cpu_us_per_req,
        r.cpu_pct,
        r.proxy_core_busy,
        r.load_core_busy,
        r.rss_mib,
        r.non2xx,
        r.errors
    );
}

fn median(mut v: Vec<f64>) -> f64 {
    v.retain(|x| !x.is_nan());
    if v.is_empty() {
        return f64::NAN;
    }
    v.sort_by(f64::total_cmp);
    let n = v.len();
    if n % 2 == 1 {
        v[n / 2]
    } else {
        (v[n / 2 - 1] + v[n / 2]) / 2.0
    }
}

fn sleep_until(t: Instant) {
    let now = Instant::now();
    if t > now {
        std::thread::sleep(t - now);
    }
}

fn uptime() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| {
            let f: Vec<&str> = s.split_whitespace().take(3).collect();
            format!("load average {}", f.join(" "))
        })
        .unwrap_or_default()
}
