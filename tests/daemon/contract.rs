#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! SPEC.md promises not covered by the other modules: `secondary_wait` bounds
//! the client's wait (and holds it for a backup that answers in time), the oldest-record age, the in-flight budget for chunked
//! bodies, the gauges while draining, and the mode of `routing.state`.

use std::os::unix::fs::PermissionsExt;
use std::time::Duration;

use forkd::sink::Behavior;

use crate::common::*;

/// A bound on the client's wait that is far below a 60 s target timeout: a
/// failure bound, not a measurement of speed.
const CLIENT_BOUND: Duration = Duration::from_secs(20);

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_active_active_a_backup_that_never_answers_does_not_hold_the_client_past_secondary_wait()
{
    let primary = sink_with(Behavior::Status(201)).await;
    // The backup reads the request and never answers; its timeout is 60 s.
    let backup = sink_with(Behavior::Hang).await;
    let d = Daemon::start(
        &Conf::pair(&primary, &backup)
            .routing("secondary_wait = \"1s\"")
            .target_line("backup", "timeout = \"60s\""),
    )
    .await;

    let r = tokio::time::timeout(CLIENT_BOUND, d.post("/aa", "answer me"))
        .await
        .expect("the client waited for the backup's 60 s timeout, not secondary_wait");

    assert_eq!(r.status, 201, "the primary's answer: {}", r.text());
    assert_eq!(delivered_bodies(&primary), ["answer me"]);
    // The live copy reached the backup; the replay of the spooled copy may
    // have followed it already (the backup hangs on both).
    let got = backup.received();
    assert!(!got.is_empty(), "the live copy never reached the backup");
    assert!(got.iter().all(|r| r.body == "answer me"));
    assert_eq!(d.target_result("backup", "spooled").await, 1.0);
    assert_eq!(d.target_result("backup", "delivered").await, 0.0);
    assert_eq!(d.target_result("primary", "delivered").await, 1.0);
    assert_eq!(d.target_status("backup").await["buffer_records"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn in_active_active_a_backup_that_answers_within_secondary_wait_is_delivered_live_not_spooled()
 {
    let primary = sink_with(Behavior::Status(201)).await;
    // The backup answers well after the primary, well within secondary_wait.
    let backup = sink_with(Behavior::Delay(Duration::from_millis(300), 200)).await;
    let d = Daemon::start(&Conf::pair(&primary, &backup).routing("secondary_wait = \"30s\"")).await;

    let r = d.post("/aa", "both live").await;

    assert_eq!(r.status, 201, "the primary's answer: {}", r.text());
    assert_eq!(
        backup.delivered().len(),
        1,
        "the client was answered before the backup's copy had its outcome"
    );
    assert_eq!(d.target_result("backup", "delivered").await, 1.0);
    assert_eq!(d.target_result("backup", "spooled").await, 0.0);
    assert_eq!(d.target_status("backup").await["buffer_records"], 0);
    assert_eq!(d.target_status("backup").await["state"], "up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn secondary_wait_never_spools_a_copy_twice_when_the_backups_spool_write_outlasts_it() {
    let primary = sink().await;
    let mut backup = stopped_sink().await;
    // `0s`, and 4 MiB bodies synced to disk: every copy for the down backup
    // is still being written to its spool when the primary has answered and
    // the wait ends.
    let d = Daemon::start(&Conf::pair(&primary, &backup).routing("secondary_wait = \"0s\"")).await;

    let bodies: Vec<String> = (0..5)
        .map(|i| format!("rec-{i}-{}", "x".repeat(4 << 20)))
        .collect();
    for b in &bodies {
        assert_eq!(d.post("/s", b.clone()).await.status, 200);
    }

    assert_eq!(d.target_status("backup").await["buffer_records"], 5);
    assert_eq!(d.target_result("backup", "spooled").await, 5.0);
    backup.restart().await.unwrap();
    d.wait_drained("backup").await;
    assert_eq!(
        delivered_bodies(&backup),
        bodies,
        "each record once, in order"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_oldest_record_age_grows_while_a_record_waits_and_is_0_once_the_spool_drains() {
    let primary = sink().await;
    let mut backup = stopped_sink().await;
    let d = Daemon::start(&Conf::pair(&primary, &backup)).await;
    let metric_age = async || {
        d.metric(
            "forkd_buffer_oldest_record_age_seconds",
            &[("target", "backup")],
        )
        .await
    };
    let status_age = async || {
        d.target_status("backup").await["oldest_record_age_seconds"]
            .as_f64()
            .expect("oldest_record_age_seconds is a number")
    };
    assert_eq!(metric_age().await, 0.0, "an empty spool has age 0");
    assert_eq!(status_age().await, 0.0, "an empty spool has age 0");

    assert_eq!(d.post("/age", "waiting").await.status, 200);
    assert_eq!(d.target_status("backup").await["buffer_records"], 1);
    wait_for("the metric's age to reach 1 s", async || {
        metric_age().await >= 1.0
    })
    .await;
    wait_for("/status's age to reach 1 s", async || {
        status_age().await >= 1.0
    })
    .await;
    // The primary's spool never held anything.
    assert_eq!(
        d.metric(
            "forkd_buffer_oldest_record_age_seconds",
            &[("target", "primary")]
        )
        .await,
        0.0
    );

    backup.restart().await.unwrap();
    d.wait_drained("backup").await;
    assert_eq!(delivered_bodies(&backup), ["waiting"]);
    assert_eq!(metric_age().await, 0.0, "the drained spool's age");
    assert_eq!(status_age().await, 0.0, "the drained spool's age");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_that_cannot_get_in_flight_budget_within_request_timeout_gets_503_with_retry_after()
 {
    // The first request hangs at the target until its 30 s timeout.
    let primary = sink_scripted([Behavior::Hang]).await;
    let d = Daemon::start(
        &Conf::new()
            .target("primary", &primary.url())
            .target_line("primary", "timeout = \"30s\"")
            .server("max_body_size = \"64KiB\"")
            .server("max_inflight_bytes = \"64KiB\"")
            .server("request_timeout = \"1s\""),
    )
    .await;

    // The first request holds 48 KiB of the 64 KiB budget while its target hangs.
    let first = {
        let client = d.client.clone();
        let req = http::Request::post(d.url("/first"))
            .body(http_body_util::Full::new(body_of("first", 48 << 10)))
            .unwrap();
        tokio::spawn(async move { client.request(req).await })
    };
    wait_for("the first request to reach the target", async || {
        primary.received().len() == 1
    })
    .await;

    // A chunked body of 32 KiB (no Content-Length): its first 16 KiB fit in
    // what is left, the rest cannot. The whole body is sent, so the client
    // is not slow: only the budget stands in the way.
    let chunk = "c".repeat(8 << 10);
    let mut req =
        String::from("POST /second HTTP/1.1\r\nHost: forkd\r\nTransfer-Encoding: chunked\r\n\r\n");
    for _ in 0..4 {
        req.push_str(&format!("{:x}\r\n{chunk}\r\n", chunk.len()));
    }
    req.push_str("0\r\n\r\n");
    let mut s = connect(d.running().addr).await;
    write_all(&mut s, req.as_bytes()).await;
    let mut buf = Vec::new();
    let head = read_head(&mut s, &mut buf).await;

    assert_eq!(head_status(&head), 503, "{head}");
    assert!(
        head.to_ascii_lowercase().contains("\r\nretry-after:"),
        "503 without Retry-After: {head}"
    );
    assert_eq!(
        primary.received().len(),
        1,
        "the chunked request was forwarded"
    );
    assert!(
        !first.is_finished(),
        "the first request should still be in flight"
    );
    assert_eq!(
        d.metric("forkd_requests_total", &[("status", "503")]).await,
        1.0
    );
    // The refused request's partial reservation is given back at once:
    // only the first request's 48 KiB stays reserved.
    wait_for("the refused request's budget to be released", async || {
        d.metric("forkd_inflight_bytes", &[]).await == f64::from(48u32 << 10)
    })
    .await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_draining_target_is_not_up_in_forkd_target_up_and_is_draining_in_forkd_target_state() {
    let primary = sink().await;
    let mut backup = stopped_sink().await;
    let d = Daemon::start(
        &Conf::pair(&primary, &backup)
            .target_line("backup", "timeout = \"60s\"")
            .buffer("drain_concurrency = 1"),
    )
    .await;
    for i in 0..3 {
        assert_eq!(d.post("/d", format!("rec-{i}")).await.status, 200);
    }
    d.wait_state("backup", "down").await;

    // Back: the first replay is delivered (down → draining), the second hangs
    // for the 60 s timeout with a record still behind it, so the target stays
    // draining for the rest of the test.
    backup.push_script(Behavior::Status(200));
    backup.push_script(Behavior::Hang);
    backup.restart().await.unwrap();
    d.wait_state("backup", "draining").await;
    wait_for("the second replay to reach the backup", async || {
        backup.received().len() == 2
    })
    .await;

    let m = d.metrics().await;
    assert_eq!(
        m.get("forkd_target_up", &[("target", "backup")]),
        Some(0.0),
        "a draining target counted as up:\n{}",
        m.0
    );
    for (state, v) in [("draining", 1.0), ("up", 0.0), ("down", 0.0)] {
        assert_eq!(
            m.get(
                "forkd_target_state",
                &[("target", "backup"), ("state", state)]
            ),
            Some(v),
            "forkd_target_state{{state={state}}}"
        );
    }
    assert_eq!(
        m.get("forkd_target_up", &[("target", "primary")]),
        Some(1.0)
    );
    assert_eq!(d.state("backup").await, "draining");
    assert_eq!(delivered_bodies(&backup), ["rec-0"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_routing_state_file_saved_by_an_admin_switch_is_readable_by_its_owner_only() {
    let primary = sink().await;
    let backup = sink().await;
    let d = Daemon::start(&Conf::pair(&primary, &backup).active_passive("primary")).await;

    let r = d.switch("backup", None).await;
    assert_eq!(r.status, 200, "{}", r.text());

    let path = d.buffer_dir().join("routing.state");
    let mode = std::fs::metadata(&path)
        .unwrap_or_else(|e| panic!("{}: {e}", path.display()))
        .permissions()
        .mode();
    assert_eq!(
        mode & 0o777,
        0o600,
        "{} has mode {:o}",
        path.display(),
        mode & 0o777
    );
}
