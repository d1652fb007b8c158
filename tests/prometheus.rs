#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! A real Prometheus against a real forkd: Debian's `prometheus` binary on
//! loopback scrapes an in-process forkd every second and loads
//! `deploy/prometheus/forkd-rules.yml`. The test reads `forkd_build_info` and
//! `forkd_target_up` back through Prometheus's HTTP API, checks that every
//! alerting rule evaluates without error (and that ForkdTargetDown is pending
//! for the target that is down, and nothing else is active), and runs every
//! query of `deploy/grafana/forkd.json` (template variables substituted),
//! requiring each to succeed and return data.
//!
//! Without a `prometheus` binary on PATH the test prints a SKIP line and
//! passes, unless FORKD_TEST_REQUIRE_PROMETHEUS is set (as `.ci/run` does), in
//! which case it fails. Everything listens on 127.0.0.1; nothing sleeps to
//! synchronise: each wait polls a condition with a deadline.

#[path = "common/mod.rs"]
mod common;

use std::collections::{BTreeMap, BTreeSet};
use std::net::{SocketAddr, TcpListener};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::{BodyExt, Full};
use serde_json::Value;
use tempfile::TempDir;

use common::*;

/// Set to make a missing `prometheus` binary a failure instead of a skip.
const REQUIRE_ENV: &str = "FORKD_TEST_REQUIRE_PROMETHEUS";
/// How long Prometheus may take to start, scrape and evaluate (a failure bound).
const PROM_DEADLINE: Duration = Duration::from_secs(60);
/// The scrape job name the rules expect (ForkdDown matches `up{job="forkd"}`).
const JOB: &str = "forkd";

fn repo_file(rel: &str) -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join(rel)
}

/// `prometheus` on PATH, if any.
fn find_prometheus() -> Option<PathBuf> {
    let path = std::env::var_os("PATH")?;
    std::env::split_paths(&path)
        .map(|d| d.join("prometheus"))
        .find(|p| p.is_file())
}

/// A loopback port that was free a moment ago.
fn free_port() -> u16 {
    TcpListener::bind("127.0.0.1:0")
        .unwrap()
        .local_addr()
        .unwrap()
        .port()
}

/// A running Prometheus; killed and reaped on drop.
struct Prometheus {
    child: Child,
    addr: SocketAddr,
    log: PathBuf,
    _dir: TempDir,
}

impl Drop for Prometheus {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Prometheus {
    /// Starts `bin` scraping `scrape` (forkd's admin address) every second,
    /// with forkd's alerting rules loaded, and waits until it is ready.
    async fn start(bin: &Path, scrape: SocketAddr) -> Prometheus {
        let mut last_log = String::new();
        // The port is picked by binding and dropping a socket; another process
        // could take it in between, so a start that fails is tried again.
        for _ in 0..3 {
            let dir = tempfile::tempdir().unwrap();
            let config = dir.path().join("prometheus.yml");
            let rules = repo_file("deploy/prometheus/forkd-rules.yml");
            std::fs::write(
                &config,
                format!(
                    "global:\n  scrape_interval: 1s\n  scrape_timeout: 1s\n  evaluation_interval: 1s\n\
                     rule_files:\n  - {rules:?}\n\
                     scrape_configs:\n  - job_name: {JOB}\n    static_configs:\n      - targets: [\"{scrape}\"]\n",
                    rules = rules.display().to_string(),
                ),
            )
            .unwrap();
            let addr = SocketAddr::from(([127, 0, 0, 1], free_port()));
            let log = dir.path().join("prometheus.log");
            let out = std::fs::File::create(&log).unwrap();
            let child = Command::new(bin)
                .arg(format!("--config.file={}", config.display()))
                .arg(format!(
                    "--storage.tsdb.path={}",
                    dir.path().join("data").display()
                ))
                .arg(format!("--web.listen-address={addr}"))
                .current_dir(dir.path())
                .stdin(Stdio::null())
                .stdout(out.try_clone().unwrap())
                .stderr(out)
                .spawn()
                .unwrap_or_else(|e| panic!("cannot start {}: {e}", bin.display()));
            let mut prom = Prometheus {
                child,
                addr,
                log,
                _dir: dir,
            };
            if prom.wait_ready().await {
                return prom;
            }
            last_log = prom.log_tail();
        }
        panic!("prometheus did not start (3 tries); last log:\n{last_log}");
    }

    /// Polls `/-/ready`; false if the process exits first.
    async fn wait_ready(&mut self) -> bool {
        let client = client();
        let start = Instant::now();
        loop {
            if let Ok(Some(status)) = self.child.try_wait() {
                eprintln!("prometheus exited ({status}):\n{}", self.log_tail());
                return false;
            }
            if let Ok((200, _)) = get(&client, &format!("http://{}/-/ready", self.addr)).await {
                return true;
            }
            assert!(
                start.elapsed() < PROM_DEADLINE,
                "prometheus not ready after {PROM_DEADLINE:?}; log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }

    fn log_tail(&self) -> String {
        let text = std::fs::read_to_string(&self.log).unwrap_or_default();
        let lines: Vec<&str> = text.lines().collect();
        lines[lines.len().saturating_sub(40)..].join("\n")
    }

    /// GET an API path; the decoded JSON (any HTTP status: errors are JSON too).
    async fn api(&self, client: &HttpClient, path_and_query: &str) -> Value {
        let url = format!("http://{}{path_and_query}", self.addr);
        let (status, body) = get(client, &url)
            .await
            .unwrap_or_else(|e| panic!("GET {url}: {e}\nprometheus log:\n{}", self.log_tail()));
        serde_json::from_slice(&body).unwrap_or_else(|e| {
            panic!(
                "GET {url}: {status}, not JSON ({e}): {}",
                String::from_utf8_lossy(&body)
            )
        })
    }

    /// An instant query; the whole answer (`status`, `data`, `error`).
    async fn query(&self, client: &HttpClient, promql: &str) -> Value {
        self.api(client, &format!("/api/v1/query?query={}", encode(promql)))
            .await
    }

    /// An instant query that must succeed; its result vector.
    async fn vector(&self, client: &HttpClient, promql: &str) -> Vec<Value> {
        let v = self.query(client, promql).await;
        assert_eq!(v["status"], "success", "query {promql:?} failed: {v}");
        match &v["data"]["result"] {
            Value::Array(a) => a.clone(),
            other => panic!("query {promql:?}: not a vector: {other}"),
        }
    }

    /// Polls until `cond` holds on the result of `promql`.
    async fn wait_query(
        &self,
        client: &HttpClient,
        what: &str,
        promql: &str,
        cond: impl Fn(&[Value]) -> bool,
    ) -> Vec<Value> {
        let start = Instant::now();
        loop {
            let r = self.vector(client, promql).await;
            if cond(&r) {
                return r;
            }
            assert!(
                start.elapsed() < PROM_DEADLINE,
                "timed out after {PROM_DEADLINE:?} waiting for {what}; {promql} = {r:?}\nprometheus log:\n{}",
                self.log_tail()
            );
            tokio::time::sleep(Duration::from_millis(100)).await;
        }
    }
}

async fn get(client: &HttpClient, url: &str) -> Result<(u16, Bytes), String> {
    let req = Request::get(url).body(Full::<Bytes>::default()).unwrap();
    let resp = client.request(req).await.map_err(|e| format!("{e:?}"))?;
    let status = resp.status().as_u16();
    let body = resp
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((status, body))
}

/// Percent-encodes a query parameter value.
fn encode(s: &str) -> String {
    let mut out = String::with_capacity(s.len() * 3);
    for b in s.bytes() {
        if b.is_ascii_alphanumeric() || b"-_.~".contains(&b) {
            out.push(char::from(b));
        } else {
            out.push_str(&format!("%{b:02X}"));
        }
    }
    out
}

/// The sample value of a vector element.
fn value_of(sample: &Value) -> f64 {
    sample["value"][1]
        .as_str()
        .unwrap_or_else(|| panic!("no value in {sample}"))
        .parse()
        .unwrap()
}

/// The value of the element whose `label` is `want`.
fn value_where(result: &[Value], label: &str, want: &str) -> Option<f64> {
    result
        .iter()
        .find(|s| s["metric"][label] == want)
        .map(value_of)
}

/// Every PromQL query of a Grafana dashboard: panel targets (rows' nested
/// panels included) and the selectors of `label_values(...)` variables.
fn dashboard_queries(dash: &Value) -> Vec<(String, String)> {
    fn panels(list: &Value, out: &mut Vec<(String, String)>) {
        for p in list.as_array().into_iter().flatten() {
            let title = p["title"].as_str().unwrap_or("?").to_owned();
            for t in p["targets"].as_array().into_iter().flatten() {
                let expr = t["expr"]
                    .as_str()
                    .unwrap_or_else(|| panic!("panel {title:?}: a target has no expr: {t}"));
                out.push((format!("panel {title:?} {}", t["refId"]), expr.to_owned()));
            }
            panels(&p["panels"], out);
        }
    }
    let mut out = Vec::new();
    panels(&dash["panels"], &mut out);
    for var in dash["templating"]["list"].as_array().into_iter().flatten() {
        if var["type"] != "query" {
            continue;
        }
        let q = var["query"]["query"]
            .as_str()
            .or_else(|| var["query"].as_str())
            .unwrap_or_else(|| panic!("variable without a query: {var}"));
        let inner = q
            .strip_prefix("label_values(")
            .and_then(|r| r.strip_suffix(')'))
            .unwrap_or_else(|| panic!("variable {}: not label_values(...): {q}", var["name"]));
        let (selector, label) = inner.rsplit_once(',').unwrap();
        out.push((
            format!("variable {}", var["name"]),
            format!("group by ({}) ({selector})", label.trim()),
        ));
    }
    out
}

/// Replaces Grafana's variables: interval built-ins by `1m`, the dashboard's
/// own variables by `.*`. Fails on a variable the dashboard does not define.
fn substitute(expr: &str, defined: &BTreeSet<String>) -> String {
    let mut out = String::with_capacity(expr.len());
    let mut rest = expr;
    while let Some(i) = rest.find('$') {
        out.push_str(&rest[..i]);
        let after = &rest[i + 1..];
        let (name, consumed) = if let Some(braced) = after.strip_prefix('{') {
            let end = braced
                .find('}')
                .unwrap_or_else(|| panic!("unclosed ${{ in {expr}"));
            let name = braced[..end].split(':').next().unwrap_or_default();
            (name, end + 2)
        } else {
            let end = after
                .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
                .unwrap_or(after.len());
            (&after[..end], end)
        };
        match name {
            "__rate_interval" | "__interval" | "__range" => out.push_str("1m"),
            n if defined.contains(n) => out.push_str(".*"),
            n => panic!("{expr}: ${n} is not a variable of the dashboard"),
        }
        rest = &after[consumed..];
    }
    out.push_str(rest);
    out
}

/// Every `forkd_*` metric name an expression refers to.
fn metric_names(expr: &str) -> BTreeSet<String> {
    let mut names = BTreeSet::new();
    let bytes = expr.as_bytes();
    let mut i = 0;
    while let Some(pos) = expr[i..].find("forkd_") {
        let start = i + pos;
        let boundary = start == 0 || {
            let c = bytes[start - 1];
            !(c.is_ascii_alphanumeric() || c == b'_' || c == b'"')
        };
        let end = expr[start..]
            .find(|c: char| !(c.is_ascii_alphanumeric() || c == '_'))
            .map_or(expr.len(), |e| start + e);
        if boundary {
            names.insert(expr[start..end].to_owned());
        }
        i = end;
    }
    names
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn prometheus_scrapes_forkd_and_evaluates_every_alert_and_dashboard_query() {
    let Some(bin) = find_prometheus() else {
        assert!(
            std::env::var_os(REQUIRE_ENV).is_none(),
            "{REQUIRE_ENV} is set but no prometheus binary is on PATH (apt-get install prometheus)"
        );
        println!(
            "SKIP prometheus_scrapes_forkd_and_evaluates_every_alert_and_dashboard_query: \
             no prometheus binary on PATH (apt-get install prometheus)"
        );
        return;
    };

    // forkd between a live primary and a backup whose region is down.
    let primary = sink().await;
    let backup = stopped_sink().await;
    let d = Daemon::start(&Conf::pair(&primary, &backup)).await;
    for i in 0..3 {
        let r = d.post("/v1/logs", format!("record {i}")).await;
        assert_eq!(r.status, 200, "{}", r.text());
    }
    d.wait_state("backup", "down").await;

    let prom = Prometheus::start(&bin, d.running().admin_addr).await;
    let c = client();

    // A successful scrape of forkd.
    prom.wait_query(
        &c,
        "a successful scrape",
        &format!("up{{job=\"{JOB}\"}}"),
        |r| r.len() == 1 && value_of(&r[0]) == 1.0,
    )
    .await;

    // forkd_build_info, with this build's version.
    let info = prom
        .vector(&c, &format!("forkd_build_info{{job=\"{JOB}\"}}"))
        .await;
    assert_eq!(info.len(), 1, "{info:?}");
    assert_eq!(info[0]["metric"]["version"], env!("CARGO_PKG_VERSION"));
    assert_eq!(value_of(&info[0]), 1.0);

    // forkd_target_up: the primary up, the backup (region down) not.
    let up = prom
        .wait_query(
            &c,
            "forkd_target_up for both targets",
            "forkd_target_up",
            |r| {
                value_where(r, "target", "primary") == Some(1.0)
                    && value_where(r, "target", "backup") == Some(0.0)
            },
        )
        .await;
    assert_eq!(up.len(), 2, "{up:?}");

    // Enough samples that rate() over 1m has data.
    prom.wait_query(
        &c,
        "three scrapes",
        "count_over_time(forkd_build_info[1m])",
        |r| r.first().is_some_and(|s| value_of(s) >= 3.0),
    )
    .await;

    // Every alerting rule of forkd-rules.yml loaded, evaluated, healthy.
    let rules_text =
        std::fs::read_to_string(repo_file("deploy/prometheus/forkd-rules.yml")).unwrap();
    let declared: BTreeSet<String> = rules_text
        .lines()
        .filter_map(|l| l.trim().strip_prefix("- alert:"))
        .map(|n| n.trim().to_owned())
        .collect();
    assert!(
        declared.len() >= 8,
        "alerts in forkd-rules.yml: {declared:?}"
    );
    let start = Instant::now();
    let rules: BTreeMap<String, Value> = loop {
        let v = prom.api(&c, "/api/v1/rules?type=alert").await;
        assert_eq!(v["status"], "success", "{v}");
        let rules: BTreeMap<String, Value> = v["data"]["groups"]
            .as_array()
            .unwrap()
            .iter()
            .flat_map(|g| g["rules"].as_array().unwrap().clone())
            .map(|r| (r["name"].as_str().unwrap().to_owned(), r))
            .collect();
        let evaluated = rules.values().all(|r| r["health"] != "unknown");
        if evaluated && !rules.is_empty() {
            break rules;
        }
        assert!(
            start.elapsed() < PROM_DEADLINE,
            "rules not evaluated: {v}\n{}",
            prom.log_tail()
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    };
    assert_eq!(
        rules.keys().cloned().collect::<BTreeSet<_>>(),
        declared,
        "rules Prometheus loaded vs alerts in the file"
    );
    let mut names = BTreeSet::new();
    for (name, rule) in &rules {
        assert_eq!(rule["health"], "ok", "rule {name}: {rule}");
        let expr = rule["query"].as_str().unwrap();
        let v = prom.query(&c, expr).await;
        assert_eq!(v["status"], "success", "rule {name}: {expr}: {v}");
        for key in ["summary", "description", "runbook_url"] {
            assert!(
                rule["annotations"][key]
                    .as_str()
                    .is_some_and(|s| !s.is_empty()),
                "rule {name}: no {key} annotation"
            );
        }
        names.extend(metric_names(expr));
    }

    // The alerts active now: ForkdTargetDown for the backup (pending: it has
    // a `for`), and nothing else.
    let expected = vec![(
        "ForkdTargetDown".to_owned(),
        "backup".to_owned(),
        "pending".to_owned(),
    )];
    let start = Instant::now();
    loop {
        let alerts = prom.api(&c, "/api/v1/alerts").await;
        let active: Vec<(String, String, String)> = alerts["data"]["alerts"]
            .as_array()
            .unwrap()
            .iter()
            .map(|a| {
                let label = |k: &str| a["labels"][k].as_str().unwrap_or_default().to_owned();
                let state = a["state"].as_str().unwrap_or_default().to_owned();
                (label("alertname"), label("target"), state)
            })
            .collect();
        if active == expected {
            break;
        }
        assert!(
            start.elapsed() < PROM_DEADLINE && active.iter().all(|a| expected.contains(a)),
            "active alerts: {alerts}"
        );
        tokio::time::sleep(Duration::from_millis(100)).await;
    }

    // Every dashboard query succeeds and returns data.
    let dash: Value = serde_json::from_str(
        &std::fs::read_to_string(repo_file("deploy/grafana/forkd.json")).unwrap(),
    )
    .unwrap();
    let defined: BTreeSet<String> = dash["templating"]["list"]
        .as_array()
        .unwrap()
        .iter()
        .map(|v| v["name"].as_str().unwrap().to_owned())
        .collect();
    let queries = dashboard_queries(&dash);
    assert!(queries.len() >= 20, "dashboard queries: {}", queries.len());
    for (where_, expr) in &queries {
        let promql = substitute(expr, &defined);
        let v = prom.query(&c, &promql).await;
        assert_eq!(v["status"], "success", "{where_}: {promql}: {v}");
        let empty = v["data"]["result"].as_array().is_none_or(Vec::is_empty);
        assert!(!empty, "{where_}: {promql}: no data");
        names.extend(metric_names(&promql));
    }

    // Every forkd metric the rules and the dashboard name is one forkd exports.
    assert!(names.len() >= 15, "metric names found: {names:?}");
    for name in &names {
        let r = prom
            .vector(
                &c,
                &format!("count({{__name__=\"{name}\", job=\"{JOB}\"}})"),
            )
            .await;
        assert!(
            !r.is_empty(),
            "{name} is used by the rules or the dashboard but not exported"
        );
    }

    drop(prom);
    let mut d = d;
    d.shutdown().await;
}
