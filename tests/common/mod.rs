#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic, dead_code)]
//! Shared helpers of the in-process daemon tests: a config builder, a running
//! forkd with an HTTP client, metric scraping, raw-TCP HTTP and `wait_for`.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use bytes::Bytes;
use forkd::app::{self, Running};
use forkd::config::Config;
use forkd::sink::{Behavior, Sink, SinkBuilder};
use http::{HeaderMap, Method, Request, StatusCode};
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::TokioExecutor;
use tempfile::TempDir;
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::TcpStream;

/// How long a condition may take before the test fails (a failure bound, not a measurement).
pub const DEADLINE: Duration = Duration::from_secs(20);

/// Polls `cond` every 10 ms until it holds; fails naming `what` after [`DEADLINE`].
pub async fn wait_for(what: &str, mut cond: impl AsyncFnMut() -> bool) {
    let start = Instant::now();
    loop {
        if cond().await {
            return;
        }
        assert!(
            start.elapsed() < DEADLINE,
            "timed out after {DEADLINE:?} waiting for: {what}"
        );
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
}

/// A sink answering 200 to everything.
pub async fn sink() -> Sink {
    SinkBuilder::new().start().await.unwrap()
}

/// A sink answering `b` to everything.
pub async fn sink_with(b: Behavior) -> Sink {
    SinkBuilder::new()
        .default_behavior(b)
        .start()
        .await
        .unwrap()
}

/// A sink answering `script` in order, then 200.
pub async fn sink_scripted(script: impl IntoIterator<Item = Behavior>) -> Sink {
    SinkBuilder::new().script(script).start().await.unwrap()
}

/// A sink that is not listening (a region outage): started, then stopped.
pub async fn stopped_sink() -> Sink {
    let mut s = sink().await;
    s.stop().await;
    s
}

/// Bodies of the requests a sink answered with 2xx, in arrival order, as text.
pub fn delivered_bodies(s: &Sink) -> Vec<String> {
    s.delivered()
        .iter()
        .map(|r| String::from_utf8_lossy(&r.body).into_owned())
        .collect()
}

/// A forkd config, rendered to TOML. Every section gets test-friendly
/// defaults: loopback port 0 listeners, quick retries, a short shutdown.
#[derive(Debug, Clone, Default)]
pub struct Conf {
    server: Vec<String>,
    admin: Vec<String>,
    routing: Vec<String>,
    buffer: Vec<String>,
    retry: Vec<String>,
    /// name → (url, extra lines, buffer override lines)
    targets: BTreeMap<String, (String, Vec<String>, Vec<String>)>,
}

impl Conf {
    pub fn new() -> Self {
        Self::default()
    }

    /// Active-active, active = primary, with these two targets.
    pub fn pair(primary: &Sink, backup: &Sink) -> Self {
        Self::new()
            .target("primary", &primary.url())
            .target("backup", &backup.url())
    }

    pub fn target(mut self, name: &str, url: &str) -> Self {
        self.targets
            .insert(name.into(), (url.into(), Vec::new(), Vec::new()));
        self
    }

    pub fn remove_target(mut self, name: &str) -> Self {
        self.targets.remove(name);
        self
    }

    /// A line in `[targets.<name>]`.
    pub fn target_line(mut self, name: &str, line: &str) -> Self {
        self.targets
            .get_mut(name)
            .expect("target configured first")
            .1
            .push(line.into());
        self
    }

    /// A line in `[targets.<name>.buffer]`.
    pub fn target_buffer(mut self, name: &str, line: &str) -> Self {
        self.targets
            .get_mut(name)
            .expect("target configured first")
            .2
            .push(line.into());
        self
    }

    pub fn server(mut self, line: &str) -> Self {
        self.server.push(line.into());
        self
    }

    pub fn admin(mut self, line: &str) -> Self {
        self.admin.push(line.into());
        self
    }

    pub fn routing(mut self, line: &str) -> Self {
        self.routing.push(line.into());
        self
    }

    pub fn buffer(mut self, line: &str) -> Self {
        self.buffer.push(line.into());
        self
    }

    pub fn retry(mut self, line: &str) -> Self {
        self.retry.push(line.into());
        self
    }

    /// `mode = "active-passive"` with `active = <active>`.
    pub fn active_passive(self, active: &str) -> Self {
        self.routing("mode = \"active-passive\"")
            .routing(&format!("active = \"{active}\""))
    }

    /// The TOML text, with `buffer.dir` = `buffer_dir`.
    pub fn render(&self, buffer_dir: &Path) -> String {
        fn has(lines: &[String], key: &str) -> bool {
            lines
                .iter()
                .any(|l| l.trim_start().starts_with(&format!("{key} ")))
        }
        let mut s = String::new();
        s.push_str("[server]\nlisten = \"127.0.0.1:0\"\n");
        if !has(&self.server, "shutdown_timeout") {
            s.push_str("shutdown_timeout = \"3s\"\n");
        }
        for l in &self.server {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str("\n[admin]\nlisten = \"127.0.0.1:0\"\n");
        for l in &self.admin {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str("\n[log]\nlevel = \"warn\"\n\n[routing]\n");
        for l in &self.routing {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str(&format!(
            "\n[buffer]\ndir = {:?}\n",
            buffer_dir.display().to_string()
        ));
        for l in &self.buffer {
            s.push_str(l);
            s.push('\n');
        }
        s.push_str("\n[retry]\n");
        if !has(&self.retry, "initial_backoff") {
            s.push_str("initial_backoff = \"20ms\"\n");
        }
        if !has(&self.retry, "max_backoff") {
            s.push_str("max_backoff = \"200ms\"\n");
        }
        for l in &self.retry {
            s.push_str(l);
            s.push('\n');
        }
        for (name, (url, lines, buffer)) in &self.targets {
            s.push_str(&format!("\n[targets.{name}]\nurl = {url:?}\n"));
            if !has(lines, "connect_timeout") {
                s.push_str("connect_timeout = \"1s\"\n");
            }
            if !has(lines, "timeout") {
                s.push_str("timeout = \"5s\"\n");
            }
            for l in lines {
                s.push_str(l);
                s.push('\n');
            }
            if !buffer.is_empty() {
                s.push_str(&format!("\n[targets.{name}.buffer]\n"));
                for l in buffer {
                    s.push_str(l);
                    s.push('\n');
                }
            }
        }
        s
    }
}

/// What a client got back.
#[derive(Debug)]
pub struct Reply {
    pub status: StatusCode,
    pub headers: HeaderMap,
    pub body: Bytes,
}

impl Reply {
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&self.body).into_owned()
    }

    pub fn header(&self, name: &str) -> Option<String> {
        self.headers
            .get(name)
            .map(|v| v.to_str().unwrap().to_owned())
    }
}

pub type HttpClient = Client<HttpConnector, Full<Bytes>>;

pub fn client() -> HttpClient {
    Client::builder(TokioExecutor::new()).build(HttpConnector::new())
}

/// A forkd running in this process on a temporary directory.
pub struct Daemon {
    pub dir: TempDir,
    pub config_path: PathBuf,
    pub running: Option<Running>,
    pub client: HttpClient,
}

impl Daemon {
    /// Writes `conf` (buffer.dir = `<tempdir>/spool`) and starts forkd on it.
    pub async fn start(conf: &Conf) -> Daemon {
        let dir = tempfile::tempdir().unwrap();
        let config_path = dir.path().join("forkd.toml");
        let mut d = Daemon {
            config_path,
            dir,
            running: None,
            client: client(),
        };
        d.write_config(conf);
        d.boot().await;
        d
    }

    /// `forkd spool inspect`'s report on `target`'s spool directory.
    pub fn inspect(&self, target: &str) -> forkd::spool::inspect::TargetReport {
        let report = forkd::spool::inspect::inspect(&self.buffer_dir(), false).unwrap();
        report
            .targets
            .into_iter()
            .find(|t| t.name == target)
            .unwrap_or_else(|| panic!("no spool for {target} in spool inspect"))
    }

    pub fn buffer_dir(&self) -> PathBuf {
        self.dir.path().join("spool")
    }

    /// Rewrites the config file (for a reload or a restart).
    pub fn write_config(&self, conf: &Conf) {
        std::fs::write(&self.config_path, conf.render(&self.buffer_dir())).unwrap();
    }

    /// Starts forkd on the config file (after a shutdown: a restart).
    pub async fn boot(&mut self) {
        assert!(self.running.is_none(), "already running");
        let config = Config::load(&self.config_path).unwrap_or_else(|e| {
            panic!(
                "config does not load: {e}\n{}",
                std::fs::read_to_string(&self.config_path).unwrap()
            )
        });
        let running = app::start(config, Some(self.config_path.clone()))
            .await
            .unwrap_or_else(|e| panic!("forkd does not start: {e}"));
        self.running = Some(running);
        // A fresh client: the old one's pooled connections went to the old listener.
        self.client = client();
    }

    pub fn running(&self) -> &Running {
        self.running.as_ref().expect("forkd is running")
    }

    /// Stops forkd (in-flight requests finish, spools are synced and closed).
    pub async fn shutdown(&mut self) {
        if let Some(r) = self.running.take() {
            r.shutdown().await;
        }
    }

    /// Shutdown, then start again on the same config and directories.
    pub async fn restart(&mut self) {
        self.shutdown().await;
        self.boot().await;
    }

    /// Re-reads the config file, as SIGHUP does.
    pub async fn reload(&self, conf: &Conf) -> Result<(), String> {
        self.write_config(conf);
        self.running().control.reload().await
    }

    pub fn url(&self, path: &str) -> String {
        format!("http://{}{path}", self.running().addr)
    }

    pub fn admin_url(&self, path: &str) -> String {
        format!("http://{}{path}", self.running().admin_addr)
    }

    /// Sends `req` (its URI a path) to forkd's listener.
    pub async fn send(&self, req: Request<Full<Bytes>>) -> Reply {
        let (mut parts, body) = req.into_parts();
        parts.uri = self.url(&parts.uri.to_string()).parse().unwrap();
        send(&self.client, Request::from_parts(parts, body)).await
    }

    pub async fn post(&self, path: &str, body: impl Into<Bytes>) -> Reply {
        self.send(Request::post(path).body(Full::new(body.into())).unwrap())
            .await
    }

    pub async fn get(&self, path: &str) -> Reply {
        self.send(Request::get(path).body(Full::default()).unwrap())
            .await
    }

    /// A request to the admin listener, with an optional bearer token.
    pub async fn admin(
        &self,
        method: Method,
        path: &str,
        body: &str,
        token: Option<&str>,
    ) -> Reply {
        let mut b = Request::builder().method(method).uri(self.admin_url(path));
        if let Some(t) = token {
            b = b.header("authorization", format!("Bearer {t}"));
        }
        send(
            &self.client,
            b.body(Full::new(Bytes::from(body.to_owned()))).unwrap(),
        )
        .await
    }

    /// `POST /admin/active` with `{"target": <target>}`.
    pub async fn switch(&self, target: &str, token: Option<&str>) -> Reply {
        self.admin(
            Method::POST,
            "/admin/active",
            &format!("{{\"target\":\"{target}\"}}"),
            token,
        )
        .await
    }

    /// `GET /status` as JSON.
    pub async fn status(&self) -> serde_json::Value {
        let r = self.admin(Method::GET, "/status", "", None).await;
        assert_eq!(r.status, StatusCode::OK, "/status: {}", r.text());
        serde_json::from_slice(&r.body).unwrap()
    }

    /// A target's entry in `/status`.
    pub async fn target_status(&self, target: &str) -> serde_json::Value {
        self.status().await["targets"][target].clone()
    }

    /// `GET /metrics` text.
    pub async fn metrics(&self) -> Metrics {
        let r = self.admin(Method::GET, "/metrics", "", None).await;
        assert_eq!(r.status, StatusCode::OK);
        Metrics(r.text())
    }

    /// One series' value; fails when the series is not exported.
    pub async fn metric(&self, name: &str, labels: &[(&str, &str)]) -> f64 {
        let m = self.metrics().await;
        m.get(name, labels)
            .unwrap_or_else(|| panic!("series {name}{labels:?} not exported:\n{}", m.0))
    }

    /// `forkd_target_requests_total{target, result}`.
    pub async fn target_result(&self, target: &str, result: &str) -> f64 {
        self.metric(
            "forkd_target_requests_total",
            &[("target", target), ("result", result)],
        )
        .await
    }

    /// A target's `state` in `/status`.
    pub async fn state(&self, target: &str) -> String {
        self.target_status(target).await["state"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    }

    pub async fn wait_state(&self, target: &str, state: &str) {
        wait_for(&format!("{target} to be {state}"), async || {
            self.state(target).await == state
        })
        .await;
    }

    /// Waits until `target`'s spool is empty and the target is up.
    pub async fn wait_drained(&self, target: &str) {
        wait_for(&format!("{target} to drain and be up"), async || {
            let t = self.target_status(target).await;
            t["buffer_records"] == 0 && t["state"] == "up"
        })
        .await;
    }
}

/// Sends a request with an absolute URI.
pub async fn send(client: &HttpClient, req: Request<Full<Bytes>>) -> Reply {
    let what = format!("{} {}", req.method(), req.uri());
    let resp = client
        .request(req)
        .await
        .unwrap_or_else(|e| panic!("{what}: {e:?}"));
    let (parts, body) = resp.into_parts();
    let body = body.collect().await.unwrap().to_bytes();
    Reply {
        status: parts.status,
        headers: parts.headers,
        body,
    }
}

/// The text exposition of `/metrics`.
#[derive(Debug, Clone)]
pub struct Metrics(pub String);

impl Metrics {
    /// The value of the series `name` whose labels are exactly `labels`.
    pub fn get(&self, name: &str, labels: &[(&str, &str)]) -> Option<f64> {
        let want: BTreeMap<String, String> = labels
            .iter()
            .map(|(k, v)| ((*k).to_owned(), (*v).to_owned()))
            .collect();
        self.series(name)
            .into_iter()
            .find(|(l, _)| *l == want)
            .map(|(_, v)| v)
    }

    /// Every series of `name`: labels and value.
    pub fn series(&self, name: &str) -> Vec<(BTreeMap<String, String>, f64)> {
        let mut out = Vec::new();
        for line in self.0.lines().filter(|l| !l.starts_with('#')) {
            let Some((head, value)) = line.rsplit_once(' ') else {
                continue;
            };
            let (n, labels) = match head.split_once('{') {
                Some((n, rest)) => (n, rest.trim_end_matches('}')),
                None => (head, ""),
            };
            if n != name {
                continue;
            }
            let mut map = BTreeMap::new();
            for kv in split_labels(labels) {
                if let Some((k, v)) = kv.split_once('=') {
                    map.insert(k.to_owned(), v.trim_matches('"').to_owned());
                }
            }
            out.push((map, value.parse().unwrap()));
        }
        out
    }

    pub fn contains(&self, needle: &str) -> bool {
        self.0.contains(needle)
    }
}

/// Splits `a="x",b="y,z"` at the commas between labels.
fn split_labels(s: &str) -> Vec<&str> {
    let mut out = Vec::new();
    let mut start = 0;
    let mut quoted = false;
    let mut escaped = false;
    for (i, c) in s.char_indices() {
        match c {
            _ if escaped => escaped = false,
            '\\' => escaped = true,
            '"' => quoted = !quoted,
            ',' if !quoted => {
                out.push(&s[start..i]);
                start = i + 1;
            }
            _ => {}
        }
    }
    if start < s.len() {
        out.push(&s[start..]);
    }
    out
}

/// Raw TCP: connects to `addr`.
pub async fn connect(addr: std::net::SocketAddr) -> TcpStream {
    TcpStream::connect(addr).await.unwrap()
}

/// Reads one HTTP/1.1 response head (status line and headers) from `s`;
/// returns it as text. `buf` keeps bytes read past the head.
pub async fn read_head(s: &mut TcpStream, buf: &mut Vec<u8>) -> String {
    let deadline = Instant::now() + DEADLINE;
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            buf.drain(..end + 4);
            return head;
        }
        let mut chunk = [0u8; 4096];
        let n = tokio::time::timeout_at(deadline.into(), s.read(&mut chunk))
            .await
            .expect("no response head in time")
            .expect("read failed");
        assert!(
            n > 0,
            "connection closed before a response head; got {:?}",
            String::from_utf8_lossy(buf)
        );
        buf.extend_from_slice(&chunk[..n]);
    }
}

/// The status code in a response head.
pub fn head_status(head: &str) -> u16 {
    head.split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or_else(|| panic!("not a status line: {head:?}"))
}

/// Writes `bytes` to `s`.
pub async fn write_all(s: &mut TcpStream, bytes: &[u8]) {
    s.write_all(bytes).await.unwrap();
    s.flush().await.unwrap();
}

/// A body of `n` bytes that starts with `tag` (so sinks can tell bodies apart).
pub fn body_of(tag: &str, n: usize) -> Bytes {
    let mut v = tag.as_bytes().to_vec();
    v.resize(n.max(tag.len()), b'.');
    Bytes::from(v)
}

/// Every file's bytes under `dir`, concatenated (to look for leaked secrets).
pub fn all_file_bytes(dir: &Path) -> Vec<u8> {
    let mut out = Vec::new();
    let mut stack = vec![dir.to_path_buf()];
    while let Some(d) = stack.pop() {
        let Ok(rd) = std::fs::read_dir(&d) else {
            continue;
        };
        for e in rd.flatten() {
            let p = e.path();
            if p.is_dir() {
                stack.push(p);
            } else if let Ok(b) = std::fs::read(&p) {
                out.extend_from_slice(&b);
            }
        }
    }
    out
}

/// True when `haystack` contains `needle`.
pub fn contains_bytes(haystack: &[u8], needle: &[u8]) -> bool {
    haystack.windows(needle.len()).any(|w| w == needle)
}
