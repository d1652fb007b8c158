#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Process-level tests: the built `forkd` binary, its exit codes, its output,
//! its signals (SIGHUP reload, SIGTERM/SIGINT shutdown, SIGKILL recovery) and
//! the demo. Every address is picked by the kernel (port 0) and read back from
//! the `forkd started` log line; every wait polls with a deadline.

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{SocketAddr, TcpStream};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitStatus, Output, Stdio};
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

mod common;
mod harness;

use forkd::sink::{Behavior, Sink, SinkBuilder};
use forkd::spool::{FsyncPolicy, Spool, SpoolOptions, WhenFull};
use tempfile::TempDir;

// ---------------------------------------------------------------- helpers

const BIN: &str = env!("CARGO_BIN_EXE_forkd");
/// Upper bound for anything a test waits for; only reached when something is wrong.
const DEADLINE: Duration = Duration::from_secs(60);
const TICK: Duration = Duration::from_millis(20);

/// A command for the binary with a clean environment for forkd: no
/// `RUST_LOG` (the `forkd started` line must be logged) and no `FORKD__*`
/// overrides inherited from whoever runs the tests.
fn forkd() -> Command {
    let mut cmd = Command::new(BIN);
    cmd.env_remove("RUST_LOG").env_remove("RUST_BACKTRACE");
    for (k, _) in std::env::vars_os() {
        if k.to_string_lossy().starts_with("FORKD__") {
            cmd.env_remove(k);
        }
    }
    cmd
}

fn output(args: &[&str], env: &[(&str, &str)]) -> Output {
    let mut cmd = forkd();
    cmd.args(args).stdin(Stdio::null());
    for (k, v) in env {
        cmd.env(k, v);
    }
    let child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    wait_output(child, DEADLINE)
}

/// `wait_with_output` with a deadline (the child is killed past it).
fn wait_output(mut child: Child, deadline: Duration) -> Output {
    let mut stdout = child.stdout.take().unwrap();
    let mut stderr = child.stderr.take().unwrap();
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stdout.read_to_end(&mut b);
        b
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        let _ = stderr.read_to_end(&mut b);
        b
    });
    let status = wait_exit(&mut child, deadline);
    Output {
        status,
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    }
}

fn wait_exit(child: &mut Child, deadline: Duration) -> ExitStatus {
    let until = Instant::now() + deadline;
    loop {
        if let Some(status) = child.try_wait().unwrap() {
            return status;
        }
        if Instant::now() > until {
            let _ = child.kill();
            let _ = child.wait();
            panic!(
                "forkd (pid {}) did not exit within {deadline:?}",
                child.id()
            );
        }
        std::thread::sleep(TICK);
    }
}

/// Polls `f` until it returns `Some`, or fails with `what` at the deadline.
fn eventually<T>(what: &str, mut f: impl FnMut() -> Option<T>) -> T {
    let until = Instant::now() + DEADLINE;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < until, "timed out waiting for {what}");
        std::thread::sleep(TICK);
    }
}

fn text(b: &[u8]) -> String {
    String::from_utf8_lossy(b).into_owned()
}

fn assert_no_panic(stderr: &str) {
    assert!(!stderr.contains("panicked"), "stderr:\n{stderr}");
    assert!(!stderr.contains("RUST_BACKTRACE"), "stderr:\n{stderr}");
    assert!(!stderr.contains("stack backtrace"), "stderr:\n{stderr}");
}

fn signal(pid: u32, sig: &str) {
    let status = Command::new("kill")
        .args([format!("-{sig}"), pid.to_string()])
        .status()
        .unwrap();
    assert!(status.success(), "kill -{sig} {pid} failed");
}

/// A running `forkd run`: its stderr is collected line by line in a thread.
struct Daemon {
    child: Child,
    stderr: Arc<Mutex<Vec<String>>>,
    addr: SocketAddr,
    admin: SocketAddr,
}

impl Daemon {
    /// Starts `forkd run --config PATH` and waits for `forkd started`.
    fn start(config: &Path) -> Daemon {
        let mut cmd = forkd();
        cmd.args(["run", "--config"]).arg(config);
        Daemon::spawn(cmd)
    }

    /// Starts `cmd` (a `forkd run`) and waits for `forkd started`.
    fn spawn(cmd: Command) -> Daemon {
        let harness::Started {
            child,
            stderr,
            addr,
            admin,
        } = harness::spawn_started(cmd);
        Daemon {
            child,
            stderr,
            addr,
            admin,
        }
    }

    fn pid(&self) -> u32 {
        self.child.id()
    }

    fn stderr(&self) -> String {
        self.stderr.lock().unwrap().join("\n")
    }

    fn signal(&self, sig: &str) {
        signal(self.pid(), sig);
    }

    fn is_running(&mut self) -> bool {
        self.child.try_wait().unwrap().is_none()
    }

    fn wait(&mut self) -> ExitStatus {
        wait_exit(&mut self.child, DEADLINE)
    }

    fn status(&self) -> serde_json::Value {
        let r = http(self.admin, "GET", "/status", &[], b"");
        assert_eq!(r.status, 200, "{}", r.body_text());
        serde_json::from_slice(&r.body).unwrap()
    }

    fn metrics(&self) -> String {
        let r = http(self.admin, "GET", "/metrics", &[], b"");
        assert_eq!(r.status, 200);
        r.body_text()
    }

    fn post(&self, id: &str, body: &[u8]) -> Response {
        http(
            self.addr,
            "POST",
            "/ingest",
            &[("X-Request-Id", id), ("Content-Type", "text/plain")],
            body,
        )
    }
}

impl Drop for Daemon {
    fn drop(&mut self) {
        if self.child.try_wait().ok().flatten().is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

struct Response {
    status: u16,
    body: Vec<u8>,
}

impl Response {
    fn body_text(&self) -> String {
        text(&self.body)
    }
}

/// One HTTP/1.1 exchange on a fresh connection (`Connection: close`).
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Response {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(DEADLINE)).unwrap();
    let mut req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: {}\r\n",
        body.len()
    );
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    s.write_all(req.as_bytes()).unwrap();
    s.write_all(body).unwrap();
    let mut raw = Vec::new();
    s.read_to_end(&mut raw).unwrap();
    let split = raw
        .windows(4)
        .position(|w| w == b"\r\n\r\n")
        .unwrap_or_else(|| panic!("no header end in {:?}", text(&raw)));
    let head = text(&raw[..split]);
    let mut rest = raw[split + 4..].to_vec();
    let status: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|s| s.parse().ok())
        .unwrap_or_else(|| panic!("bad status line in {head:?}"));
    if head
        .lines()
        .any(|l| l.to_ascii_lowercase().starts_with("transfer-encoding:") && l.contains("chunked"))
    {
        rest = dechunk(&rest);
    }
    Response { status, body: rest }
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(eol) = b.windows(2).position(|w| w == b"\r\n") else {
            return out;
        };
        let size_text = text(&b[..eol]);
        let size = usize::from_str_radix(size_text.split(';').next().unwrap().trim(), 16).unwrap();
        if size == 0 {
            return out;
        }
        out.extend_from_slice(&b[eol + 2..eol + 2 + size]);
        b = &b[eol + 2 + size + 2..];
    }
}

fn runtime() -> tokio::runtime::Runtime {
    tokio::runtime::Builder::new_multi_thread()
        .worker_threads(2)
        .enable_all()
        .build()
        .unwrap()
}

fn sink(rt: &tokio::runtime::Runtime) -> Sink {
    rt.block_on(SinkBuilder::new().start()).unwrap()
}

/// Two sinks on a runtime of their own, and a setup whose config (written,
/// its path last) forks active-active between them, the primary active.
/// Bound in this order, the runtime is dropped last.
fn active_active_pair() -> (tokio::runtime::Runtime, Sink, Sink, Setup, PathBuf) {
    let rt = runtime();
    let primary = sink(&rt);
    let backup = sink(&rt);
    let s = Setup::new();
    let path = s.write(&s.config("active-active", "primary", &primary.url(), &backup.url()));
    (rt, primary, backup, s, path)
}

/// A test's files: the config and the spool directory.
struct Setup {
    dir: TempDir,
}

impl Setup {
    fn new() -> Setup {
        Setup {
            dir: tempfile::tempdir().unwrap(),
        }
    }

    fn spool_dir(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    fn config_path(&self) -> PathBuf {
        self.dir.path().join("forkd.toml")
    }

    /// Writes (or rewrites) `forkd.toml`.
    fn write(&self, text: &str) -> PathBuf {
        let path = self.config_path();
        // Write then rename, so a reload never reads half a file.
        let tmp = self.dir.path().join("forkd.toml.tmp");
        std::fs::write(&tmp, text).unwrap();
        std::fs::rename(&tmp, &path).unwrap();
        path
    }

    /// A config on loopback port 0 with two targets.
    fn config(&self, mode: &str, active: &str, primary: &str, backup: &str) -> String {
        format!(
            r#"
[server]
listen = "127.0.0.1:0"
shutdown_timeout = "5s"

[admin]
listen = "127.0.0.1:0"

[log]
level = "info"
format = "text"

[routing]
mode = "{mode}"
active = "{active}"

[targets.primary]
url = "{primary}"
timeout = "5s"
connect_timeout = "1s"

[targets.backup]
url = "{backup}"
timeout = "5s"
connect_timeout = "1s"

[buffer]
dir = "{dir}"
max_size = "64MiB"
fsync = "always"
drain_concurrency = 1

[retry]
initial_backoff = "20ms"
max_backoff = "200ms"
"#,
            dir = self.spool_dir().display()
        )
    }
}

/// A URL nothing listens on (for targets that are never reached).
const NOWHERE: &str = "http://127.0.0.1:9";

/// A `forkd run` child whose stderr lines are collected by a thread, for
/// tests that cannot wait for a text-format `forkd started` line.
struct Collected {
    child: Child,
    lines: Arc<Mutex<Vec<String>>>,
    reader: std::thread::JoinHandle<()>,
}

impl Collected {
    fn spawn(cmd: Command) -> Collected {
        let (child, lines, reader) = harness::spawn_collecting_stderr(cmd);
        Collected {
            child,
            lines,
            reader,
        }
    }

    /// Waits for a stderr line that satisfies `pred`; fails if forkd exits first.
    fn wait_line(&mut self, what: &str, pred: impl Fn(&str) -> bool) -> String {
        eventually(what, || {
            if let Some(l) = self.lines.lock().unwrap().iter().find(|l| pred(l)) {
                return Some(l.clone());
            }
            if let Some(status) = self.child.try_wait().unwrap() {
                panic!(
                    "forkd exited with {status} before {what}:\n{}",
                    self.lines.lock().unwrap().join("\n")
                );
            }
            None
        })
    }

    /// Sends `sig`, waits for the exit and for the last stderr line; returns
    /// the exit status and every stderr line.
    fn stop(mut self, sig: &str) -> (ExitStatus, Vec<String>) {
        signal(self.child.id(), sig);
        let status = wait_exit(&mut self.child, DEADLINE);
        // The pipe closes when forkd exits: the reader has every line then.
        self.reader.join().unwrap();
        let lines = std::mem::take(&mut *self.lines.lock().unwrap());
        (status, lines)
    }
}

/// A target that holds its first request until told to answer: it reports
/// the request's arrival on `arrived` and answers 200 once `release` is sent
/// (or dropped).
struct GatedTarget {
    url: String,
    arrived: std::sync::mpsc::Receiver<()>,
    release: std::sync::mpsc::Sender<()>,
}

fn gated_target() -> GatedTarget {
    let listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let url = format!("http://{}", listener.local_addr().unwrap());
    let (arrived_tx, arrived) = std::sync::mpsc::channel();
    let (release, release_rx) = std::sync::mpsc::channel::<()>();
    std::thread::spawn(move || {
        let Ok((mut s, _)) = listener.accept() else {
            return;
        };
        let mut buf = Vec::new();
        let mut chunk = [0u8; 16 << 10];
        let mut read_more = |buf: &mut Vec<u8>| match s.read(&mut chunk) {
            Ok(n) if n > 0 => {
                buf.extend_from_slice(&chunk[..n]);
                true
            }
            _ => false,
        };
        let head_end = loop {
            if let Some(p) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
                break p + 4;
            }
            if !read_more(&mut buf) {
                return;
            }
        };
        let head = text(&buf[..head_end]).to_ascii_lowercase();
        let len: usize = head
            .lines()
            .find_map(|l| l.strip_prefix("content-length:"))
            .and_then(|v| v.trim().parse().ok())
            .unwrap_or(0);
        while buf.len() < head_end + len {
            if !read_more(&mut buf) {
                return;
            }
        }
        let _ = arrived_tx.send(());
        let _ = release_rx.recv();
        let _ =
            s.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 3\r\nConnection: close\r\n\r\nok\n");
    });
    GatedTarget {
        url,
        arrived,
        release,
    }
}

/// One request on a new connection: its status, or `None` when the
/// connection is refused, or reset or closed before an answer.
fn try_http(addr: SocketAddr, method: &str, path: &str) -> Option<u16> {
    let mut s = TcpStream::connect(addr).ok()?;
    s.set_read_timeout(Some(DEADLINE)).ok()?;
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Length: 0\r\n\r\n"
    );
    s.write_all(req.as_bytes()).ok()?;
    let mut raw = Vec::new();
    let _ = s.read_to_end(&mut raw);
    text(&raw).split_whitespace().nth(1)?.parse().ok()
}

// ---------------------------------------------------------------- command line

#[test]
fn version_prints_the_version_and_exits_0() {
    let out = output(&["--version"], &[]);
    assert_eq!(out.status.code(), Some(0));
    let stdout = text(&out.stdout);
    assert!(stdout.contains(env!("CARGO_PKG_VERSION")), "{stdout}");
    assert!(stdout.starts_with("forkd"), "{stdout}");
}

#[test]
fn usage_errors_exit_2() {
    for args in [
        &["frobnicate"][..],
        &["run"][..],
        &["check"][..],
        &["run", "--config"][..],
        &["run", "--bogus", "x"][..],
        &[][..],
    ] {
        let out = output(args, &[]);
        assert_eq!(out.status.code(), Some(2), "forkd {args:?}");
        assert_no_panic(&text(&out.stderr));
    }
}

#[test]
fn check_prints_a_valid_config_redacted_with_warnings_on_stderr() {
    let s = Setup::new();
    let config = format!(
        "{}\n[targets.backup.headers]\nAuthorization = \"Bearer ${{FORKD_TEST_TOKEN}}\"\n\n[targets.backup.buffer]\nwhen_full = \"reject\"\n",
        s.config(
            "active-active",
            "primary",
            "http://127.0.0.1:19001",
            "http://127.0.0.1:19002/v1?sig=sas-secret-123"
        )
    );
    let path = s.write(&config);
    let token = "tok-secret-8d1c5e";
    let out = output(
        &["check", "--config", path.to_str().unwrap()],
        &[("FORKD_TEST_TOKEN", token)],
    );
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    assert!(!stdout.contains(token), "{stdout}");
    assert!(!stderr.contains(token), "{stderr}");
    assert!(!stdout.contains("sas-secret-123"), "{stdout}");
    assert!(stdout.contains("<redacted>"), "{stdout}");
    // The normalized config: TOML with everything else shown.
    let parsed: toml::Table = stdout.parse().unwrap();
    assert_eq!(parsed["routing"]["mode"].as_str(), Some("active-active"));
    assert_eq!(
        parsed["targets"]["primary"]["url"].as_str(),
        Some("http://127.0.0.1:19001")
    );
    assert!(parsed["server"]["max_body_size"].as_str().is_some());
    // The warning goes to stderr, naming the target.
    assert!(
        stderr.lines().any(|l| l.starts_with("warning: ")
            && l.contains("targets.backup")
            && l.contains("reject")),
        "{stderr}"
    );
    assert!(!stdout.contains("warning"), "{stdout}");
}

#[test]
fn check_refuses_a_config_that_names_an_unset_variable() {
    let s = Setup::new();
    let config = format!(
        "{}\n[targets.backup.headers]\nAuthorization = \"Bearer ${{FORKD_TEST_UNSET_TOKEN}}\"\n",
        s.config(
            "active-active",
            "primary",
            "http://127.0.0.1:19001",
            "http://127.0.0.1:19002"
        )
    );
    let path = s.write(&config);
    let out = output(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_no_panic(&stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(
        stderr.contains("targets.backup.headers.Authorization: ")
            && stderr.contains("FORKD_TEST_UNSET_TOKEN"),
        "{stderr}"
    );
}

const INVALID: &str = r#"
[server]
listen = "127.0.0.1:0"
max_body_size = "0B"

[admin]
listen = "127.0.0.1:0"

[routing]
active = "primary"
spooled_status = 503

[targets.primary]
url = "http://127.0.0.1:19001"

[targets.backup]
url = "ftp://127.0.0.1:19002"

[buffer]
dir = "SPOOL"
max_size = "10KiB"
"#;

const INVALID_KEYS: [&str; 4] = [
    "server.max_body_size: ",
    "routing.spooled_status: ",
    "targets.backup.url: ",
    "buffer.max_size: ",
];

fn assert_one_line_per_problem(stderr: &str) {
    assert_no_panic(stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), INVALID_KEYS.len(), "stderr:\n{stderr}");
    for key in INVALID_KEYS {
        assert!(
            lines.iter().any(|l| l.contains(key)),
            "no line names {key:?}:\n{stderr}"
        );
    }
}

#[test]
fn check_refuses_an_invalid_config_with_one_line_per_problem() {
    let s = Setup::new();
    let path = s.write(&INVALID.replace("SPOOL", &s.spool_dir().display().to_string()));
    let out = output(&["check", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    assert_one_line_per_problem(&text(&out.stderr));
    assert!(out.stdout.is_empty(), "{}", text(&out.stdout));
}

#[test]
fn check_on_a_missing_file_exits_1_with_one_line() {
    let s = Setup::new();
    let out = output(
        &[
            "check",
            "--config",
            s.dir.path().join("nope.toml").to_str().unwrap(),
        ],
        &[],
    );
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_no_panic(&stderr);
    assert_eq!(stderr.lines().count(), 1, "{stderr}");
    assert!(stderr.contains("nope.toml"), "{stderr}");
}

#[test]
fn run_refuses_an_invalid_config_before_binding_or_opening_anything() {
    let s = Setup::new();
    let path = s.write(&INVALID.replace("SPOOL", &s.spool_dir().display().to_string()));
    let out = output(&["run", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_one_line_per_problem(&stderr);
    assert!(!stderr.contains("forkd started"), "{stderr}");
    assert!(!s.spool_dir().exists(), "the spool directory was created");
}

#[test]
fn run_on_a_spool_locked_by_another_forkd_exits_1_naming_the_directory() {
    let (_rt, _primary, _backup, s, path) = active_active_pair();
    let mut first = Daemon::start(&path);

    let out = output(&["run", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_no_panic(&stderr);
    let errors: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(errors.len(), 1, "one line, stderr:\n{stderr}");
    assert!(errors[0].starts_with("forkd: "), "{}", errors[0]);
    let spool = s.spool_dir();
    assert!(
        errors[0].contains(&spool.display().to_string()),
        "the error does not name {}: {}",
        spool.display(),
        errors[0]
    );
    assert!(errors[0].contains("in use"), "{}", errors[0]);
    assert!(!stderr.contains("forkd started"), "{stderr}");
    // The first one is unharmed.
    assert!(first.is_running());
    assert_eq!(http(first.admin, "GET", "/readyz", &[], b"").status, 200);
}

#[test]
fn run_on_an_address_in_use_exits_1_with_one_line() {
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port();
    let s = Setup::new();
    let config = s
        .config("active-active", "primary", NOWHERE, NOWHERE)
        .replacen(
            "listen = \"127.0.0.1:0\"",
            &format!("listen = \"127.0.0.1:{port}\""),
            1,
        );
    let path = s.write(&config);
    let out = output(&["run", "--config", path.to_str().unwrap()], &[]);
    assert_eq!(out.status.code(), Some(1));
    let stderr = text(&out.stderr);
    assert_no_panic(&stderr);
    let lines: Vec<&str> = stderr.lines().filter(|l| !l.trim().is_empty()).collect();
    assert_eq!(lines.len(), 1, "{stderr}");
    assert!(lines[0].contains("server.listen"), "{stderr}");
    assert!(lines[0].contains(&port.to_string()), "{stderr}");
}

#[test]
fn run_with_the_short_flag_c_serves_and_reloads_like_config() {
    let (_rt, primary, backup, s, path) = active_active_pair();
    let mut cmd = forkd();
    cmd.args(["run", "-c"]).arg(&path);
    let mut d = Daemon::spawn(cmd);

    let r = d.post("short-flag", b"via -c");
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(text(&primary.delivered()[0].body), "via -c");
    assert_eq!(text(&backup.delivered()[0].body), "via -c");
    let st = d.status();
    assert_eq!(st["mode"], "active-active");
    assert_eq!(st["active"], "primary");

    // SIGHUP re-reads the file given with -c.
    s.write(&s.config("active-passive", "backup", &primary.url(), &backup.url()));
    d.signal("HUP");
    eventually("the reloaded config in /status", || {
        let st = d.status();
        (st["mode"] == "active-passive" && st["active"] == "backup").then_some(())
    });

    d.signal("TERM");
    assert_eq!(d.wait().code(), Some(0), "{}", d.stderr());
    assert_no_panic(&d.stderr());
}

#[test]
fn with_log_format_json_every_stderr_line_is_a_json_object_with_level_and_message() {
    let rt = runtime();
    let primary = sink(&rt);
    let s = Setup::new();
    let config = s
        .config("active-active", "primary", &primary.url(), NOWHERE)
        .replace("format = \"text\"", "format = \"json\"");
    let path = s.write(&config);
    let mut cmd = forkd();
    cmd.args(["run", "--config"]).arg(&path);
    let mut c = Collected::spawn(cmd);
    let started = c.wait_line("the forkd started line", |l| l.contains("forkd started"));
    let started: serde_json::Value = serde_json::from_str(&started)
        .unwrap_or_else(|e| panic!("the start line is not JSON ({e}): {started}"));
    let addr: SocketAddr = started["addr"]
        .as_str()
        .unwrap_or_else(|| panic!("no addr field: {started}"))
        .parse()
        .unwrap();

    // A request, with the backup unreachable: more events (state changes).
    let r = http(
        addr,
        "POST",
        "/ingest",
        &[("X-Request-Id", "json-log")],
        b"x",
    );
    assert_eq!(r.status, 200, "{}", r.body_text());
    eventually("the primary's copy", || {
        (primary.delivered().len() == 1).then_some(())
    });

    let (status, lines) = c.stop("TERM");
    let all = lines.join("\n");
    assert_eq!(status.code(), Some(0), "{all}");
    assert!(lines.len() >= 2, "{all}");
    let mut messages = Vec::new();
    for line in &lines {
        let v: serde_json::Value = serde_json::from_str(line)
            .unwrap_or_else(|e| panic!("a stderr line is not JSON ({e}): {line}"));
        assert!(v.is_object(), "not a JSON object: {line}");
        let level = v["level"]
            .as_str()
            .unwrap_or_else(|| panic!("no level: {line}"));
        assert!(
            ["TRACE", "DEBUG", "INFO", "WARN", "ERROR"]
                .contains(&level.to_ascii_uppercase().as_str()),
            "level {level:?}: {line}"
        );
        let message = v["message"]
            .as_str()
            .unwrap_or_else(|| panic!("no message: {line}"));
        messages.push(message.to_owned());
    }
    for want in ["forkd started", "forkd stopped"] {
        assert!(messages.iter().any(|m| m == want), "no {want:?} in:\n{all}");
    }
    assert_no_panic(&all);
}

#[test]
fn log_level_warn_shows_warnings_and_suppresses_the_info_start_line() {
    let (_rt, primary, backup, s, _) = active_active_pair();
    // `when_full = "reject"` on a secondary target is a config warning,
    // logged at start at warn level.
    let config = format!(
        "{}\n[targets.backup.buffer]\nwhen_full = \"reject\"\n",
        s.config("active-active", "primary", &primary.url(), &backup.url())
    )
    .replace("level = \"info\"", "level = \"warn\"");
    let path = s.write(&config);
    let mut cmd = forkd();
    cmd.args(["run", "--config"]).arg(&path);
    let mut c = Collected::spawn(cmd);
    // The warning is logged during start, before the `forkd started` line
    // would be, with no await between them.
    c.wait_line("the config warning", |l| {
        l.contains("WARN") && l.contains("reject")
    });

    let (status, lines) = c.stop("TERM");
    let all = lines.join("\n");
    assert_eq!(status.code(), Some(0), "{all}");
    for unwanted in ["forkd started", "SIGTERM: shutting down", "forkd stopped"] {
        assert!(!all.contains(unwanted), "an info line at level warn: {all}");
    }
    assert!(
        lines.iter().all(|l| !l.contains("INFO")),
        "an info line at level warn: {all}"
    );
    assert_no_panic(&all);
}

// ---------------------------------------------------------------- reload

#[test]
fn sighup_reloads_a_changed_config() {
    let (_rt, primary, backup, s, path) = active_active_pair();
    let mut d = Daemon::start(&path);
    let st = d.status();
    assert_eq!(st["mode"], "active-active");
    assert_eq!(st["active"], "primary");

    s.write(&s.config("active-passive", "backup", &primary.url(), &backup.url()));
    d.signal("HUP");
    let st = eventually("the reloaded config in /status", || {
        let st = d.status();
        (st["mode"] == "active-passive" && st["active"] == "backup").then_some(st)
    });
    assert_eq!(st["active_source"], "config");
    assert_eq!(st["targets"]["backup"]["selected"], true);
    assert_eq!(st["targets"]["primary"]["selected"], false);
    assert!(
        d.metrics()
            .contains("forkd_config_reloads_total{result=\"success\"} 1"),
        "{}",
        d.metrics()
    );

    // New requests follow the new config: only the backup gets them.
    let r = d.post("after-reload", b"hello");
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(backup.delivered().len(), 1);
    assert!(primary.received().is_empty());
    assert!(d.is_running());
}

#[test]
fn sighup_with_an_invalid_config_keeps_the_old_one_running() {
    let (_rt, primary, backup, s, path) = active_active_pair();
    let mut d = Daemon::start(&path);
    assert!(
        d.metrics()
            .contains("forkd_config_reloads_total{result=\"failure\"} 0"),
        "both reload results are exported from the start"
    );

    let broken = s
        .config("active-passive", "tertiary", &primary.url(), &backup.url())
        .replace("[log]", "[log]\nlevle = \"debug\"");
    s.write(&broken);
    d.signal("HUP");
    eventually("the failed reload in /metrics", || {
        d.metrics()
            .contains("forkd_config_reloads_total{result=\"failure\"} 1")
            .then_some(())
    });
    assert!(d.is_running());
    let st = d.status();
    assert_eq!(st["mode"], "active-active");
    assert_eq!(st["active"], "primary");
    assert!(
        d.metrics()
            .contains("forkd_config_reloads_total{result=\"success\"} 0")
    );
    // The reason is logged.
    eventually("the refusal in the log", || {
        d.stderr().contains("levle").then_some(())
    });
    // And it still serves under the old config: both targets get the request.
    let r = d.post("still-serving", b"hello");
    assert_eq!(r.status, 200, "{}", r.body_text());
    eventually("the fork to both targets", || {
        (primary.delivered().len() == 1 && backup.delivered().len() == 1).then_some(())
    });
    assert_no_panic(&d.stderr());
}

// ---------------------------------------------------------------- shutdown

fn spool_opens(dir: &Path) {
    let opts = SpoolOptions {
        max_size: 64 << 20,
        when_full: WhenFull::Reject,
        fsync: FsyncPolicy::Never,
        ..SpoolOptions::default()
    };
    let spool = Spool::open(dir, opts)
        .unwrap_or_else(|e| panic!("spool {} does not open: {e}", dir.display()));
    spool.close();
}

fn shuts_down_cleanly_on(sig: &str) {
    let rt = runtime();
    let primary = sink(&rt);
    let s = Setup::new();
    // The backup is down: its copies are spooled, and must be there after exit.
    let path = s.write(&s.config("active-active", "primary", &primary.url(), NOWHERE));
    let mut d = Daemon::start(&path);
    for i in 0..5 {
        let r = d.post(&format!("req-{i}"), format!("body-{i}").as_bytes());
        assert_eq!(r.status, 200, "{}", r.body_text());
    }
    d.signal(sig);
    let status = d.wait();
    assert_eq!(status.code(), Some(0), "stderr:\n{}", d.stderr());
    eventually("the shutdown log", || {
        d.stderr().contains("forkd stopped").then_some(())
    });
    assert_no_panic(&d.stderr());
    // The locks are released: the spools open again, with the backup's backlog in them.
    spool_opens(&s.spool_dir().join("primary"));
    let backup_dir = s.spool_dir().join("backup");
    let spool = Spool::open(&backup_dir, SpoolOptions::default()).unwrap();
    assert_eq!(spool.stats().records, 5);
    spool.close();
}

#[test]
fn sigterm_exits_0_and_releases_the_spool() {
    shuts_down_cleanly_on("TERM");
}

#[test]
fn sigint_exits_0_and_releases_the_spool() {
    shuts_down_cleanly_on("INT");
}

#[test]
fn sigterm_lets_an_in_flight_request_finish() {
    let rt = runtime();
    let primary = rt
        .block_on(
            SinkBuilder::new()
                .default_behavior(Behavior::Delay(Duration::from_millis(1500), 200))
                .start(),
        )
        .unwrap();
    let s = Setup::new();
    let path = s.write(&s.config("active-passive", "primary", &primary.url(), NOWHERE));
    let mut d = Daemon::start(&path);
    let client = post_in_flight(d.addr, b"slow");
    eventually("the request at the target", || {
        (!primary.received().is_empty()).then_some(())
    });
    d.signal("TERM");
    let r = client.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(d.wait().code(), Some(0), "{}", d.stderr());
    assert_eq!(primary.delivered().len(), 1);
}

/// POSTs `body` to `/ingest` (`X-Request-Id: in-flight`) from a thread of
/// its own, for a test to signal forkd while the request is in flight.
fn post_in_flight(addr: SocketAddr, body: &'static [u8]) -> std::thread::JoinHandle<Response> {
    std::thread::spawn(move || {
        http(
            addr,
            "POST",
            "/ingest",
            &[("X-Request-Id", "in-flight")],
            body,
        )
    })
}

#[test]
fn after_sigterm_new_connections_are_refused_while_an_in_flight_request_completes() {
    let gate = gated_target();
    let s = Setup::new();
    // Long bounds: nothing but the gate decides when the in-flight request ends.
    let config = s
        .config("active-passive", "primary", &gate.url, NOWHERE)
        .replace("shutdown_timeout = \"5s\"", "shutdown_timeout = \"60s\"")
        .replace("timeout = \"5s\"", "timeout = \"60s\"");
    let path = s.write(&config);
    let mut d = Daemon::start(&path);
    assert_eq!(
        try_http(d.addr, "DELETE", "/probe"),
        Some(405),
        "before SIGTERM a new connection is served"
    );
    let client = post_in_flight(d.addr, b"held at the target");
    gate.arrived
        .recv_timeout(DEADLINE)
        .expect("the request never reached the target");

    d.signal("TERM");
    // A probe answered 405 was accepted before forkd saw the signal; once it
    // stops accepting, a new connection is refused (or reset unanswered).
    eventually(
        "new connections to be refused after SIGTERM",
        || match try_http(d.addr, "DELETE", "/probe") {
            None => Some(()),
            Some(405) => None,
            Some(other) => panic!("a new connection after SIGTERM got {other}"),
        },
    );
    assert!(
        d.is_running(),
        "forkd exited with a request in flight:\n{}",
        d.stderr()
    );
    assert!(
        !client.is_finished(),
        "the in-flight request was answered early"
    );

    gate.release.send(()).unwrap();
    let r = client.join().unwrap();
    assert_eq!(r.status, 200, "{}", r.body_text());
    assert_eq!(d.wait().code(), Some(0), "{}", d.stderr());
    assert_no_panic(&d.stderr());
}

// ---------------------------------------------------------------- crash recovery

/// Acknowledged requests survive `kill -9` and reach the target, in order,
/// once it is back. `mode` decides which target is down: active-passive with
/// the active target down (every request answered 202 from the spool), or
/// active-active with the backup down (answered by the primary once the
/// backup's copy is durable).
fn acknowledged_requests_survive_kill_9(mode: &str) {
    const N: usize = 40;
    let rt = runtime();
    let mut down = sink(&rt);
    let up = sink(&rt);
    rt.block_on(down.stop());
    let s = Setup::new();
    let (config, expect) = match mode {
        "active-passive" => (s.config(mode, "primary", &down.url(), &up.url()), 202),
        _ => (s.config(mode, "primary", &up.url(), &down.url()), 200),
    };
    let path = s.write(&config);

    let mut d = Daemon::start(&path);
    let mut acked = Vec::new();
    for i in 0..N {
        let id = format!("crash-{i:03}");
        let body = format!("body of request {i}: {}", "x".repeat(i * 37));
        let r = d.post(&id, body.as_bytes());
        assert_eq!(r.status, expect, "{id}: {}", r.body_text());
        acked.push((id, body));
    }
    d.child.kill().unwrap();
    let status = d.wait();
    assert_eq!(status.code(), None, "killed by a signal");
    drop(d);

    rt.block_on(down.restart()).unwrap();
    let d = Daemon::start(&path);
    let delivered = eventually("every acknowledged request at the target", || {
        let got = down.delivered();
        let ids: BTreeSet<String> = got.iter().filter_map(request_id).collect();
        acked.iter().all(|(id, _)| ids.contains(id)).then_some(got)
    });
    // At-least-once: a duplicate is allowed, but the first arrivals are in
    // acceptance order, each with its body.
    let mut seen = BTreeSet::new();
    let mut first_arrivals = Vec::new();
    for r in &delivered {
        let id = request_id(r).unwrap();
        if seen.insert(id.clone()) {
            first_arrivals.push((id, text(&r.body)));
        }
    }
    assert_eq!(first_arrivals, acked);
    for r in &delivered {
        assert!(
            r.path_and_query.starts_with("/ingest"),
            "{}",
            r.path_and_query
        );
    }
    // The spool is empty again.
    eventually("an empty spool", || {
        let st = d.status();
        let t = if mode == "active-passive" {
            "primary"
        } else {
            "backup"
        };
        (st["targets"][t]["buffer_records"] == 0 && st["targets"][t]["state"] == "up").then_some(())
    });
    assert_no_panic(&d.stderr());
}

fn request_id(r: &forkd::sink::Received) -> Option<String> {
    r.headers
        .get("x-request-id")
        .and_then(|v| v.to_str().ok())
        .map(str::to_owned)
}

#[test]
fn requests_acknowledged_from_the_spool_survive_kill_9_in_order() {
    acknowledged_requests_survive_kill_9("active-passive");
}

#[test]
fn backup_copies_acknowledged_in_active_active_survive_kill_9_in_order() {
    acknowledged_requests_survive_kill_9("active-active");
}

// ---------------------------------------------------------------- demo

#[test]
fn the_demo_exits_0_with_both_targets_complete_and_in_order() {
    let child = forkd()
        .args(["demo", "--seconds", "6"])
        .stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let out = wait_output(child, Duration::from_secs(180));
    let stdout = text(&out.stdout);
    let stderr = text(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(0),
        "stdout:\n{stdout}\nstderr:\n{stderr}"
    );
    let summary = stdout
        .lines()
        .find(|l| l.starts_with("summary:"))
        .unwrap_or_else(|| panic!("no summary line:\n{stdout}"));
    assert!(
        summary.contains("primary complete and in order"),
        "{summary}"
    );
    assert!(
        summary.contains("backup complete and in order"),
        "{summary}"
    );
    assert_no_panic(&stderr);
}
