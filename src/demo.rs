//! `forkd demo`: the whole job on loopback, with nothing to set up.
//!
//! Two in-process sinks play the primary and backup data products; forkd runs
//! between them in active-active mode with `fsync = "always"`; a few clients
//! send numbered requests. Part way through, the backup "region" goes down
//! (its sink stops listening) and later comes back. A progress line each
//! second shows requests sent, delivered per sink, the backup's spool and its
//! state; the summary checks that both sinks hold every acknowledged request,
//! each client's requests in order.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::Request;
use http_body_util::Full;

use crate::app;
use crate::config::Config;
use crate::sink::{Sink, SinkBuilder};
use crate::upstream::HttpClient;

const CLIENTS: usize = 4;
/// Pause between one client's requests: about 4 × 100 requests a second.
const PACE: Duration = Duration::from_millis(10);

/// Runs the demo for about `load` of load; true when every check passed.
pub async fn run(load: Duration) -> Result<bool, String> {
    if std::env::var_os("RUST_LOG").is_some() {
        crate::logging::init("warn", crate::config::LogFormat::Text);
    }
    let mut primary = SinkBuilder::new()
        .start()
        .await
        .map_err(|e| format!("primary sink: {e}"))?;
    let mut backup = SinkBuilder::new()
        .start()
        .await
        .map_err(|e| format!("backup sink: {e}"))?;
    let dir = std::env::temp_dir().join(format!("forkd-demo-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).map_err(|e| format!("{}: {e}", dir.display()))?;
    let result = run_in(&dir, load, &mut primary, &mut backup).await;
    let _ = std::fs::remove_dir_all(&dir);
    result
}

async fn run_in(
    dir: &std::path::Path,
    load: Duration,
    primary: &mut Sink,
    backup: &mut Sink,
) -> Result<bool, String> {
    let config_path = dir.join("forkd.toml");
    let toml = format!(
        r#"[server]
listen = "127.0.0.1:0"
[admin]
listen = "127.0.0.1:0"
[routing]
mode = "active-active"
active = "primary"
secondary_wait = "500ms"
[targets.primary]
url = "{}"
timeout = "2s"
connect_timeout = "500ms"
[targets.backup]
url = "{}"
timeout = "2s"
connect_timeout = "500ms"
[buffer]
dir = "{}"
max_size = "64MiB"
fsync = "always"
[retry]
initial_backoff = "50ms"
max_backoff = "500ms"
"#,
        primary.url(),
        backup.url(),
        dir.join("spool").display()
    );
    std::fs::write(&config_path, toml).map_err(|e| format!("{}: {e}", config_path.display()))?;
    let config = Config::load(&config_path).map_err(|e| e.to_string())?;
    let running = app::start(config, Some(config_path))
        .await
        .map_err(|e| e.to_string())?;
    println!(
        "forkd demo: router http://{} (admin http://{}), primary sink {}, backup sink {}",
        running.addr,
        running.admin_addr,
        primary.url(),
        backup.url()
    );
    println!(
        "mode active-active, fsync always; {} clients for {}s; the backup goes down at {}s and returns at {}s",
        CLIENTS,
        load.as_secs(),
        outage_start(load).as_secs(),
        outage_end(load).as_secs()
    );

    let sent = Arc::new(AtomicU64::new(0));
    let failed = Arc::new(AtomicU64::new(0));
    let stop = Arc::new(AtomicBool::new(false));
    let client = crate::upstream::client(&demo_target())?;
    let url = format!("http://{}/ingest", running.addr);
    let mut clients = Vec::new();
    for c in 0..CLIENTS {
        let (client, url, sent, failed, stop) = (
            client.clone(),
            url.clone(),
            sent.clone(),
            failed.clone(),
            stop.clone(),
        );
        clients.push(tokio::spawn(async move {
            load_client(c, client, url, sent, failed, stop).await
        }));
    }

    let started = Instant::now();
    let mut next_tick = Duration::from_secs(1);
    let mut down = false;
    let mut restored = false;
    let drain_deadline = load + Duration::from_secs(15);
    loop {
        tokio::time::sleep_until((started + next_tick).into()).await;
        let t = started.elapsed();
        if !down && t >= outage_start(load) {
            backup.stop().await;
            down = true;
            println!(
                "[{:>3}s] backup region down (its sink stopped listening)",
                t.as_secs()
            );
        }
        if down && !restored && t >= outage_end(load) {
            backup
                .restart()
                .await
                .map_err(|e| format!("backup sink restart: {e}"))?;
            restored = true;
            println!("[{:>3}s] backup region back", t.as_secs());
        }
        if t >= load {
            stop.store(true, Ordering::Relaxed);
        }
        let status = running.control.status();
        let b = &status["targets"]["backup"];
        println!(
            "[{:>3}s] sent {:>6}  primary {:>6}  backup {:>6}  backup spool {:>5} records  backup {}",
            t.as_secs(),
            sent.load(Ordering::Relaxed),
            primary.delivered_count(),
            backup.delivered_count(),
            b["buffer_records"],
            b["state"].as_str().unwrap_or("?")
        );
        next_tick += Duration::from_secs(1);
        let all_done = clients.iter().all(tokio::task::JoinHandle::is_finished);
        if all_done && b["buffer_records"] == 0 && b["state"] == "up" && restored {
            break;
        }
        if t >= drain_deadline {
            println!("[{:>3}s] drain did not finish in time", t.as_secs());
            break;
        }
    }
    let mut acked: Vec<(usize, u64)> = Vec::new();
    for h in clients {
        acked.extend(h.await.map_err(|e| format!("load client: {e}"))?);
    }
    let ok_primary = verify("primary", primary, &acked);
    let ok_backup = verify("backup", backup, &acked);
    running.shutdown().await;
    println!(
        "summary: {} requests acknowledged, {} refused (503, to be retried by the client); primary {}, backup {}",
        acked.len(),
        failed.load(Ordering::Relaxed),
        if ok_primary {
            "complete and in order"
        } else {
            "INCOMPLETE"
        },
        if ok_backup {
            "complete and in order"
        } else {
            "INCOMPLETE"
        },
    );
    Ok(ok_primary && ok_backup && !acked.is_empty())
}

fn outage_start(load: Duration) -> Duration {
    Duration::from_secs((load.as_secs() / 4).max(2))
}

fn outage_end(load: Duration) -> Duration {
    Duration::from_secs((load.as_secs() * 3 / 5).max(outage_start(load).as_secs() + 2))
}

/// Target settings for the load client (timeouts only).
fn demo_target() -> crate::config::Target {
    crate::config::Target {
        name: "demo".into(),
        base: http::Uri::from_static("http://127.0.0.1"),
        query: Vec::new(),
        timeout: Duration::from_secs(5),
        connect_timeout: Duration::from_secs(1),
        headers: Vec::new(),
        retry_statuses: Vec::new(),
        ca_file: None,
        ca_certs: Vec::new(),
        spool: Default::default(),
        when_full: None,
        drain_concurrency: 1,
    }
}

/// One client: numbered requests one after another; returns those acknowledged.
async fn load_client(
    c: usize,
    client: HttpClient,
    url: String,
    sent: Arc<AtomicU64>,
    failed: Arc<AtomicU64>,
    stop: Arc<AtomicBool>,
) -> Vec<(usize, u64)> {
    let mut acked = Vec::new();
    let mut n: u64 = 0;
    while !stop.load(Ordering::Relaxed) {
        let body = Bytes::from(format!("{{\"client\":{c},\"seq\":{n}}}"));
        let Ok(req) = Request::post(&url)
            .header("content-type", "application/json")
            .body(Full::new(body))
        else {
            break;
        };
        sent.fetch_add(1, Ordering::Relaxed);
        match tokio::time::timeout(Duration::from_secs(10), client.request(req)).await {
            Ok(Ok(resp)) if resp.status().is_success() => acked.push((c, n)),
            _ => {
                failed.fetch_add(1, Ordering::Relaxed);
            }
        }
        n += 1;
        tokio::time::sleep(PACE).await;
    }
    acked
}

fn parse(body: &[u8]) -> Option<(usize, u64)> {
    let v: serde_json::Value = serde_json::from_slice(body).ok()?;
    Some((
        usize::try_from(v["client"].as_u64()?).ok()?,
        v["seq"].as_u64()?,
    ))
}

/// Checks that `sink` holds every acknowledged request, each client's in order.
fn verify(name: &str, sink: &Sink, acked: &[(usize, u64)]) -> bool {
    let mut first_seen: HashMap<(usize, u64), usize> = HashMap::new();
    let mut order: BTreeMap<usize, Vec<u64>> = BTreeMap::new();
    let mut duplicates = 0usize;
    for (i, r) in sink.delivered().iter().enumerate() {
        let Some(id) = parse(&r.body) else { continue };
        if first_seen.insert(id, i).is_some() {
            duplicates += 1;
            continue;
        }
        order.entry(id.0).or_default().push(id.1);
    }
    let missing = acked
        .iter()
        .filter(|id| !first_seen.contains_key(id))
        .count();
    let out_of_order: usize = order
        .values()
        .map(|seqs| seqs.windows(2).filter(|w| w[0] > w[1]).count())
        .sum();
    println!(
        "{name}: {} distinct requests, {} duplicates (at-least-once), {} acknowledged missing, {} out of order",
        first_seen.len(),
        duplicates,
        missing,
        out_of_order
    );
    missing == 0 && out_of_order == 0
}
