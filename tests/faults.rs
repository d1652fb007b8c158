#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Fault injection against the release binary: kill -9 under load, a flapping
//! target, a full disk, and a damaged spool. Each test checks forkd's promises
//! (docs/reliability.md) with sequence-numbered requests: every request
//! acknowledged to a client reaches every selected target, in each client's
//! order, and nothing is invented.
//!
//! Long variants: `FORKD_KILLS` (default 20) and `FORKD_FLAP_SECS` (default 60);
//! `FORKD_FAULT_SEED` replays a run's random choices.

mod common;
mod harness;

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::Arc;
use std::sync::atomic::{AtomicBool, Ordering};
use std::time::{Duration, Instant};

use bytes::Bytes;
use common::Conf;
use forkd::sink::{Sink, SinkBuilder};
use forkd::spool::fuzzing::{SEGMENT_HEADER_LEN, SegmentHeader, decode_frame, scan_data};
use harness::{
    Endpoint, Forkd, Load, Rng, Setup, check_delivery, env_u64, eventually, parse_tagged, runtime,
    tagged_body,
};

// ---------------------------------------------------------------- helpers

/// The kill test's unpaced load takes every core it can get; the flapping
/// test measures a recovery time. They take turns.
static HEAVY: std::sync::Mutex<()> = std::sync::Mutex::new(());

fn heavy() -> std::sync::MutexGuard<'static, ()> {
    HEAVY
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}

/// A task that stops and restarts a sink every `period` until told to stop,
/// then leaves it up and hands it back with the moment it last came up.
struct Flapper {
    stop: Arc<AtomicBool>,
    task: tokio::task::JoinHandle<(Sink, Instant, u64)>,
}

impl Flapper {
    fn start(rt: &tokio::runtime::Runtime, mut sink: Sink, period: Duration) -> Flapper {
        let stop = Arc::new(AtomicBool::new(false));
        let flag = stop.clone();
        let task = rt.spawn(async move {
            let mut flaps = 0u64;
            // The fault schedule: the target changes state every period. Once
            // told to stop, it ends on a restart after a whole period down.
            loop {
                tokio::time::sleep(period).await;
                flaps += 1;
                if sink.is_running() {
                    sink.stop().await;
                } else {
                    sink.restart().await.unwrap();
                    if flag.load(Ordering::Relaxed) {
                        break (sink, Instant::now(), flaps);
                    }
                }
            }
        });
        Flapper { stop, task }
    }

    /// Stops flapping with the sink up; returns it, when it came up for good, and the flaps done.
    fn stop(self, rt: &tokio::runtime::Runtime) -> (Sink, Instant, u64) {
        self.stop.store(true, Ordering::Relaxed);
        rt.block_on(self.task).unwrap()
    }
}

fn sink(rt: &tokio::runtime::Runtime) -> Sink {
    rt.block_on(SinkBuilder::new().start()).unwrap()
}

fn stopped_sink(rt: &tokio::runtime::Runtime) -> Sink {
    let mut s = sink(rt);
    rt.block_on(s.stop());
    s
}

/// Waits until `sink` holds every acknowledged request, then checks it.
fn wait_and_check(
    name: &str,
    sink: &Sink,
    logs: &[harness::ClientLog],
    limit: Duration,
    d: &Forkd,
) -> harness::DeliveryReport {
    let want = harness::acked_set(logs).len();
    let until = Instant::now() + limit;
    // Cheap count first; the full comparison clones every body.
    while !(sink.delivered_count() >= want && harness::all_delivered(&sink.delivered(), logs)) {
        if Instant::now() >= until {
            // Slow, or stuck: the count and forkd's view of the target tell.
            let t = d.status()["targets"][name].clone();
            panic!(
                "timed out after {limit:?} waiting for every acknowledged request at {name}: \
                 {} arrivals for {want} acknowledged; forkd: state {}, buffer_records {}",
                sink.delivered_count(),
                t["state"],
                t["buffer_records"]
            );
        }
        std::thread::sleep(harness::TICK);
    }
    check_delivery(name, &sink.delivered(), logs)
}

fn wait_drained(d: &Forkd, target: &str) {
    eventually(&format!("{target} drained and up"), || {
        let t = d.status()["targets"][target].clone();
        (t["buffer_records"] == 0 && t["state"] == "up").then_some(())
    });
}

// ---------------------------------------------------------------- kill -9 under load

#[test]
fn every_request_acknowledged_before_repeated_kill_9s_reaches_every_target_in_client_order() {
    let _heavy = heavy();
    let kills = env_u64("FORKD_KILLS", 20);
    let mut rng = Rng::from_env("kill -9 under load");
    let rt = runtime();
    let primary = sink(&rt);
    let backup = sink(&rt);
    let setup = Setup::new();
    let conf = Conf::pair(&primary, &backup)
        .routing("mode = \"active-active\"")
        .routing("active = \"primary\"")
        .routing("secondary_wait = \"1s\"")
        .buffer("fsync = \"always\"")
        .buffer("drain_concurrency = 1")
        // Room for the whole backlog, so no record is evicted (the backup's
        // `when_full` is `drop_oldest`): it grows with the run, about 3 MiB
        // per kill here (150 kills overflowed 256 MiB).
        .buffer(&format!("max_size = \"{}MiB\"", (8 * kills).max(256)));
    let config = setup.write(&conf, &setup.spool_dir());
    harness::release_bin(); // built (if needed) before the clock starts
    let flapper = Flapper::start(&rt, backup, Duration::from_millis(500));
    let endpoint = Endpoint::default();
    let load = Load::start(4, endpoint.clone(), 1_000_000, Duration::from_secs(900));

    let started = Instant::now();
    let mut acked_at_kill = Vec::new();
    for _ in 0..kills {
        let mut d = Forkd::start(&config);
        endpoint.set(Some(d.addr));
        // The fault schedule: a random moment under load.
        std::thread::sleep(Duration::from_millis(rng.range(150, 1200)));
        let status = d.kill9();
        endpoint.set(None);
        assert_eq!(status.code(), None, "forkd was killed by the signal");
        d.assert_no_panic();
        acked_at_kill.push(load.acked());
    }

    // A last forkd stays up: the clients send a little more, the backup
    // stops flapping, and everything drains.
    let d = Forkd::start(&config);
    endpoint.set(Some(d.addr));
    let before = load.acked();
    eventually("more requests acknowledged after the last restart", || {
        (load.acked() >= before + 20).then_some(())
    });
    let (backup, _, flaps) = flapper.stop(&rt);
    let logs = load.stop();
    let acked: usize = logs.iter().map(|l| l.acked.len()).sum();
    let failed: u64 = logs.iter().map(|l| l.attempts).sum::<u64>() - acked as u64;
    let limit = Duration::from_secs(180);
    let p = wait_and_check("primary", &primary, &logs, limit, &d);
    let b = wait_and_check("backup", &backup, &logs, limit, &d);
    wait_drained(&d, "primary");
    wait_drained(&d, "backup");
    eprintln!(
        "kill -9 under load: {kills} kills in {:.1}s, {acked} requests acknowledged, \
         {failed} attempts unacknowledged (retried), {flaps} backup flaps; acked at each kill: {acked_at_kill:?}",
        started.elapsed().as_secs_f64()
    );
    eprintln!("kill -9 under load: {}", p.line());
    eprintln!("kill -9 under load: {}", b.line());
    for r in [&p, &b] {
        assert!(
            r.is_complete_and_ordered(),
            "{}\nmissing: {:?}\nreordered: {:?}",
            r.line(),
            &r.missing[..r.missing.len().min(20)],
            &r.reordered[..r.reordered.len().min(20)]
        );
    }
    assert!(
        acked as u64 > kills,
        "the load got through between kills: {acked} acknowledged"
    );
    let mut d = d;
    assert_eq!(d.terminate().code(), Some(0), "{}", d.stderr());
    d.assert_no_panic();
}

// ---------------------------------------------------------------- flapping target

#[test]
fn a_target_flapping_every_half_second_loses_and_reorders_nothing_and_is_up_within_two_max_backoffs()
 {
    let _heavy = heavy();
    let flap_secs = env_u64("FORKD_FLAP_SECS", 60);
    let max_backoff = Duration::from_secs(1);
    let rt = runtime();
    let primary = sink(&rt);
    let backup = sink(&rt);
    let setup = Setup::new();
    let conf = Conf::pair(&primary, &backup)
        .routing("mode = \"active-active\"")
        .routing("active = \"primary\"")
        .buffer("fsync = \"always\"")
        .buffer("drain_concurrency = 1")
        .retry("initial_backoff = \"50ms\"")
        .retry("max_backoff = \"1s\"");
    let config = setup.write(&conf, &setup.spool_dir());
    let mut d = Forkd::start(&config);
    let endpoint = Endpoint::default();
    endpoint.set(Some(d.addr));
    // 3 clients at 50 requests/s each: a steady load that a target replaying
    // one request at a time can catch up with (see docs/reliability.md on
    // drain throughput).
    let load = Load::paced(
        3,
        endpoint.clone(),
        1_000_000,
        Duration::from_secs(flap_secs + 300),
        Some(Duration::from_millis(20)),
    );
    let flapper = Flapper::start(&rt, backup, Duration::from_millis(500));
    let until = Instant::now() + Duration::from_secs(flap_secs);
    let mut saw_down = false;
    while Instant::now() < until {
        // Observation only: the flapping is visible in /status.
        saw_down |= d.status()["targets"]["backup"]["state"] != "up";
        std::thread::sleep(Duration::from_millis(100));
    }
    let (backup, up_since, flaps) = flapper.stop(&rt);
    // The bound: 2 × max_backoff from the moment the target is up for good,
    // plus a margin for a busy machine to schedule the probe and the drain.
    let margin = Duration::from_secs(1);
    let bound = 2 * max_backoff + margin;
    let limit = bound.saturating_sub(up_since.elapsed());
    let mut trace = Vec::new();
    let deadline = Instant::now() + limit;
    let recovered = loop {
        let t = d.status()["targets"]["backup"].clone();
        trace.push(format!(
            "{:.2}s {} {}",
            up_since.elapsed().as_secs_f64(),
            t["state"],
            t["buffer_records"]
        ));
        if t["state"] == "up" {
            break up_since.elapsed();
        }
        assert!(
            Instant::now() < deadline,
            "the backup is not up {:.1}s after it stayed up (time, state, records): {trace:?}",
            up_since.elapsed().as_secs_f64()
        );
        std::thread::sleep(harness::TICK);
    };
    let logs = load.stop();
    let acked: usize = logs.iter().map(|l| l.acked.len()).sum();
    let limit = Duration::from_secs(120);
    let p = wait_and_check("primary", &primary, &logs, limit, &d);
    let b = wait_and_check("backup", &backup, &logs, limit, &d);
    wait_drained(&d, "backup");
    let failures = d.metric(
        "forkd_target_attempt_failures_total",
        &[("target", "backup"), ("reason", "connect")],
    );
    eprintln!(
        "flapping target: {flap_secs}s, {flaps} flaps, {acked} requests acknowledged, \
         backup up {:.2}s after it stayed up (bound {:.1}s), {failures} connect failures",
        recovered.as_secs_f64(),
        bound.as_secs_f64()
    );
    eprintln!("flapping target: {}", p.line());
    eprintln!("flapping target: {}", b.line());
    assert!(saw_down, "the flapping never took the backup down");
    for r in [&p, &b] {
        assert!(
            r.is_complete_and_ordered(),
            "{}\nmissing: {:?}\nreordered: {:?}",
            r.line(),
            &r.missing[..r.missing.len().min(20)],
            &r.reordered[..r.reordered.len().min(20)]
        );
    }
    assert_eq!(d.terminate().code(), Some(0), "{}", d.stderr());
    d.assert_no_panic();
}

// ---------------------------------------------------------------- disk full

/// Set to `1` to make a test that needs root (a tmpfs mount) fail instead of
/// skipping when it cannot get what it needs (`.ci/run` runs as root).
const REQUIRE_PRIVILEGED_ENV: &str = "FORKD_REQUIRE_PRIVILEGED_TESTS";

fn privileged_tests_required() -> bool {
    std::env::var(REQUIRE_PRIVILEGED_ENV).is_ok_and(|v| v.trim() == "1")
}

/// A tmpfs mounted for the life of the value.
struct Tmpfs(PathBuf);

impl Tmpfs {
    fn mount(path: &Path, size: &str) -> Result<Tmpfs, String> {
        std::fs::create_dir_all(path).map_err(|e| e.to_string())?;
        let out = Command::new("mount")
            .args([
                "-t",
                "tmpfs",
                "-o",
                &format!("size={size},mode=0700"),
                "tmpfs",
            ])
            .arg(path)
            .output()
            .map_err(|e| format!("cannot run mount: {e}"))?;
        if out.status.success() {
            Ok(Tmpfs(path.to_path_buf()))
        } else {
            Err(String::from_utf8_lossy(&out.stderr).trim().to_owned())
        }
    }
}

impl Drop for Tmpfs {
    fn drop(&mut self) {
        let ok = Command::new("umount")
            .arg(&self.0)
            .status()
            .is_ok_and(|s| s.success());
        if !ok {
            let _ = Command::new("umount").arg("-l").arg(&self.0).status();
        }
    }
}

#[test]
fn a_full_disk_gets_503_with_retry_after_and_not_ready_then_acceptance_and_delivery_resume() {
    let setup = Setup::new();
    let mnt = setup.dir.path().join("mnt");
    let _tmpfs = match Tmpfs::mount(&mnt, "4m") {
        Ok(t) => t,
        Err(why) => {
            assert!(
                !privileged_tests_required(),
                "{REQUIRE_PRIVILEGED_ENV}=1 and a tmpfs cannot be mounted: {why}"
            );
            eprintln!("SKIPPED a_full_disk_gets_503...: cannot mount a tmpfs (needs root): {why}");
            return;
        }
    };
    // Most of the file system is taken by a file of ours, so the spool hits
    // ENOSPC soon; deleting it is "space returns".
    let filler = mnt.join("filler");
    std::fs::write(&filler, vec![7u8; 3 << 20]).unwrap();
    let rt = runtime();
    let mut primary = stopped_sink(&rt);
    let backup = sink(&rt);
    let conf = Conf::pair(&primary, &backup)
        .active_passive("primary")
        .buffer("fsync = \"always\"")
        .buffer("max_size = \"64MiB\"")
        .buffer("segment_size = \"256KiB\"");
    let config = setup.write(&conf, &mnt.join("spool"));
    let mut d = Forkd::start(&config);
    assert_eq!(d.readyz(), 200);

    let mut acked = Vec::new();
    let mut refused = None;
    for i in 0..2_000usize {
        let (tag, body) = tagged_body(0, i as u64);
        let body = [body.as_slice(), &[b'.'; 6000]].concat();
        let r = d.post("/v1/ingest", &tag, &body);
        match r.status {
            202 => acked.push((tag, body)),
            503 => {
                refused = Some(r);
                break;
            }
            other => panic!("{tag}: unexpected {other}: {}", r.text()),
        }
    }
    let refused = refused.expect("the spool never hit ENOSPC");
    assert!(
        !acked.is_empty(),
        "some requests fit before the disk filled"
    );
    let before_full = acked.len();
    assert_eq!(refused.header("retry-after"), Some("1"), "{refused:?}");
    // Still full: refused the same way, the process alive and not ready.
    for i in 0..5 {
        let r = d.post("/v1/ingest", &format!("full-{i}"), &[b'x'; 6000]);
        assert_eq!(r.status, 503, "{}", r.text());
        assert!(r.header("retry-after").is_some());
    }
    assert_eq!(d.readyz(), 503, "/readyz while the spool cannot be written");
    assert_eq!(d.admin_get("/healthz").status, 200);
    assert!(d.is_running());
    assert!(primary.received().is_empty() && backup.received().is_empty());
    let refused_count = d.metric("forkd_requests_total", &[("status", "503")]);

    // Space returns: /readyz turns 200 by itself, before any request comes
    // (a load balancer that stopped sending because of it would never send
    // the request that proves the spool writable again), and acceptance resumes.
    std::fs::remove_file(&filler).unwrap();
    eventually(
        "/readyz 200 once space returned, with no request sent",
        || (d.readyz() == 200).then_some(()),
    );
    for i in 0..20u64 {
        let (tag, body) = tagged_body(1, i);
        let r = d.post("/v1/ingest", &tag, &body);
        assert_eq!(r.status, 202, "{tag} after space returned: {}", r.text());
        acked.push((tag, body));
    }
    assert_eq!(d.readyz(), 200);

    // A crash now, and a restart on the same spool: it opens cleanly with
    // every acknowledged record and no corruption.
    d.kill9();
    d.assert_no_panic();
    let mut d = Forkd::start(&config);
    assert_eq!(
        d.metric(
            "forkd_buffer_dropped_records_total",
            &[("target", "primary"), ("reason", "corrupt")]
        ),
        0.0
    );
    assert_eq!(
        d.status()["targets"]["primary"]["buffer_records"],
        acked.len(),
        "every acknowledged record is in the reopened spool"
    );
    assert_eq!(d.readyz(), 200);

    // Delivery resumes: everything acknowledged, in order, nothing else.
    rt.block_on(primary.restart()).unwrap();
    eventually("the spooled requests at the primary", || {
        (primary.delivered_count() >= acked.len()).then_some(())
    });
    wait_drained(&d, "primary");
    let mut seen = BTreeSet::new();
    let firsts: Vec<(String, Bytes)> = primary
        .delivered()
        .into_iter()
        .filter(|r| seen.insert(r.body.clone()))
        .map(|r| {
            let id = r.headers["x-request-id"].to_str().unwrap().to_owned();
            (id, r.body)
        })
        .collect();
    let want: Vec<(String, Bytes)> = acked
        .iter()
        .map(|(t, b)| (t.clone(), Bytes::from(b.clone())))
        .collect();
    assert!(firsts == want, "delivered differs from acknowledged");
    eprintln!(
        "disk full: {before_full} requests acknowledged before ENOSPC, {refused_count} refused with 503 \
         while full, {} after space returned; all {} delivered in order, none corrupt after kill -9",
        acked.len() - before_full,
        acked.len()
    );
    assert_eq!(d.terminate().code(), Some(0), "{}", d.stderr());
    d.assert_no_panic();
}

// ---------------------------------------------------------------- corruption

/// A record found in a segment file before the damage.
#[derive(Debug, Clone)]
struct OnDisk {
    id: String,
    /// File offset of the frame, and its length.
    offset: u64,
    len: u64,
}

fn segments(dir: &Path) -> Vec<PathBuf> {
    let mut v: Vec<PathBuf> = std::fs::read_dir(dir)
        .unwrap()
        .map(|e| e.unwrap().path())
        .filter(|p| p.extension().is_some_and(|e| e == "seg"))
        .collect();
    v.sort();
    v
}

fn records_in(path: &Path) -> Vec<OnDisk> {
    let bytes = std::fs::read(path).unwrap();
    let base = SegmentHeader::decode(&bytes).unwrap().base;
    let data = &bytes[SEGMENT_HEADER_LEN as usize..];
    let scan = scan_data(base, data, true);
    assert!(
        scan.corrupt.is_empty(),
        "{} is damaged already",
        path.display()
    );
    scan.records
        .iter()
        .map(|r| {
            let at = (r.lsn - base) as usize;
            let frame = Bytes::copy_from_slice(&data[at..at + r.len as usize]);
            let (record, _) = decode_frame(&frame).unwrap();
            OnDisk {
                id: record.request_id,
                offset: SEGMENT_HEADER_LEN + (r.lsn - base),
                len: r.len,
            }
        })
        .collect()
}

fn xor_byte(path: &Path, offset: u64, mask: u8) {
    use std::os::unix::fs::FileExt;
    let f = std::fs::OpenOptions::new()
        .read(true)
        .write(true)
        .open(path)
        .unwrap();
    let mut b = [0u8; 1];
    f.read_exact_at(&mut b, offset).unwrap();
    b[0] ^= mask;
    f.write_all_at(&b, offset).unwrap();
}

fn truncate(path: &Path, len: u64) {
    std::fs::OpenOptions::new()
        .write(true)
        .open(path)
        .unwrap()
        .set_len(len)
        .unwrap();
}

#[test]
fn a_stopped_spool_with_flips_truncations_and_lost_segments_starts_counts_corruption_and_delivers_the_rest_in_order()
 {
    const N: u64 = 600;
    let mut rng = Rng::from_env("corruption");
    let rt = runtime();
    let mut primary = stopped_sink(&rt);
    let backup = sink(&rt);
    let setup = Setup::new();
    let conf = Conf::pair(&primary, &backup)
        .active_passive("primary")
        .buffer("max_size = \"64MiB\"")
        .buffer("segment_size = \"64KiB\"");
    let config = setup.write(&conf, &setup.spool_dir());

    // A spool holding N records written by forkd itself.
    let mut d = Forkd::start(&config);
    for i in 0..N {
        let (tag, body) = tagged_body(0, i);
        let r = d.post("/v1/ingest", &tag, &body);
        assert_eq!(r.status, 202, "{tag}: {}", r.text());
    }
    assert_eq!(d.terminate().code(), Some(0), "{}", d.stderr());
    let dir = setup.spool_dir().join("primary");
    let segs = segments(&dir);
    assert!(segs.len() >= 6, "{} segments, want several", segs.len());
    let layout: Vec<Vec<OnDisk>> = segs.iter().map(|p| records_in(p)).collect();
    assert_eq!(layout.iter().map(Vec::len).sum::<usize>(), N as usize);

    // The damage: among the sealed segments, one deleted, one with its header
    // damaged, one cut inside a record, byte flips in records of the others;
    // the last segment cut inside a record (a torn tail).
    let last = segs.len() - 1;
    let mut sealed: Vec<usize> = (0..last).collect();
    for i in (1..sealed.len()).rev() {
        sealed.swap(i, rng.range(0, i as u64 + 1) as usize);
    }
    let (deleted, header_hit, cut) = (sealed[0], sealed[1], sealed[2]);
    let mut lost: BTreeSet<String> = BTreeSet::new();
    std::fs::remove_file(&segs[deleted]).unwrap();
    lost.extend(layout[deleted].iter().map(|r| r.id.clone()));
    xor_byte(&segs[header_hit], rng.range(0, 28), 0x5a);
    lost.extend(layout[header_hit].iter().map(|r| r.id.clone()));
    let cut_inside = |seg: usize, lost: &mut BTreeSet<String>, rng: &mut Rng| {
        let recs = &layout[seg];
        let k = if recs.len() > 1 {
            rng.range(1, recs.len() as u64) as usize
        } else {
            0
        };
        let r = &recs[k];
        truncate(&segs[seg], r.offset + rng.range(1, r.len));
        lost.extend(recs[k..].iter().map(|r| r.id.clone()));
    };
    cut_inside(cut, &mut lost, &mut rng);
    cut_inside(last, &mut lost, &mut rng);
    let mut flipped = 0;
    for &seg in &sealed[3..] {
        let recs = &layout[seg];
        let mut picks: Vec<usize> = (0..2)
            .map(|_| rng.range(0, recs.len() as u64) as usize)
            .collect();
        picks.dedup();
        for k in picks {
            let r = &recs[k];
            xor_byte(
                &segs[seg],
                r.offset + rng.range(0, r.len),
                rng.range(1, 256) as u8,
            );
            lost.insert(r.id.clone());
            flipped += 1;
        }
    }
    let expected: Vec<String> = layout
        .iter()
        .flatten()
        .map(|r| r.id.clone())
        .filter(|id| !lost.contains(id))
        .collect();

    // forkd starts on it, counts the damaged records, and holds the rest.
    let mut d = Forkd::start(&config);
    let corrupt = d.metric(
        "forkd_buffer_dropped_records_total",
        &[("target", "primary"), ("reason", "corrupt")],
    );
    assert!(corrupt > 0.0, "no corruption counted");
    // Each flipped record counts once, and so does the cut sealed segment's tail.
    assert_eq!(corrupt, f64::from(flipped + 1), "{}", d.stderr());
    assert_eq!(
        d.status()["targets"]["primary"]["buffer_records"],
        expected.len(),
        "{}",
        d.stderr()
    );

    // The rest is delivered, in order, none invented, none lost besides the damage.
    rt.block_on(primary.restart()).unwrap();
    wait_drained(&d, "primary");
    let delivered = primary.delivered();
    let mut seen = BTreeSet::new();
    let mut firsts = Vec::new();
    for r in &delivered {
        assert!(
            parse_tagged(&r.body).is_some(),
            "an invented or mangled body"
        );
        let id = r.headers["x-request-id"].to_str().unwrap().to_owned();
        assert_eq!(parse_tagged(&r.body), Some((0, id[5..12].parse().unwrap())));
        if seen.insert(id.clone()) {
            firsts.push(id);
        }
    }
    assert_eq!(firsts, expected, "survivors delivered in order");
    eprintln!(
        "corruption: {} segments, {N} records; 1 segment deleted, 1 header damaged, 2 cut, \
         {flipped} records flipped; {corrupt} counted corrupt; {} delivered in order",
        segs.len(),
        expected.len()
    );
    assert_eq!(d.terminate().code(), Some(0), "{}", d.stderr());
    d.assert_no_panic();
}
