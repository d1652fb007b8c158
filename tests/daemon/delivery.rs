#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! SPEC.md "Durability", "Order", "Duplicates" (the in-process parts) and
//! "Target states": spooling while down, draining in order, isolation.

use forkd::sink::Behavior;

use crate::common::*;

fn seq(i: usize) -> String {
    format!("seq-{i:04}")
}

fn seqs(range: std::ops::Range<usize>) -> Vec<String> {
    range.map(seq).collect()
}

// ------------------------------------------------------------ target states

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_target_spools_new_requests_then_drains_them_in_order_and_is_up_again() {
    let primary = sink().await;
    let mut backup = stopped_sink().await;
    let d = Daemon::start(
        &Conf::pair(&primary, &backup)
            .target_line("backup", "timeout = \"2s\"")
            .buffer("drain_concurrency = 1"),
    )
    .await;

    assert_eq!(d.post("/s", seq(0)).await.status, 200);
    d.wait_state("backup", "down").await;
    let m = d.metrics().await;
    for (state, v) in [("down", 1.0), ("up", 0.0), ("draining", 0.0)] {
        let got = m.get(
            "forkd_target_state",
            &[("target", "backup"), ("state", state)],
        );
        assert_eq!(got, Some(v), "forkd_target_state{{state={state}}}");
    }
    assert_eq!(m.get("forkd_target_up", &[("target", "backup")]), Some(0.0));
    assert_eq!(
        m.get("forkd_target_up", &[("target", "primary")]),
        Some(1.0)
    );

    for i in 1..10 {
        let r = d.post("/s", seq(i)).await;
        assert_eq!(r.status, 200, "primary answers while the backup is down");
    }
    assert_eq!(d.target_result("backup", "spooled").await, 10.0);
    let st = d.target_status("backup").await;
    assert_eq!(st["buffer_records"], 10, "{st}");
    assert_eq!(st["state"], "down");
    assert_eq!(delivered_bodies(&primary), seqs(0..10));

    // The backup returns: its first answer is 200 (down → draining), the
    // second hangs until the 2 s timeout, so draining is observable.
    backup.push_script(Behavior::Status(200));
    backup.push_script(Behavior::Hang);
    backup.restart().await.unwrap();
    d.wait_state("backup", "draining").await;
    assert_eq!(
        d.metric(
            "forkd_target_state",
            &[("target", "backup"), ("state", "draining")]
        )
        .await,
        1.0
    );
    wait_for("the backlog to be delivered", async || {
        backup.delivered_count() == 10
    })
    .await;
    d.wait_drained("backup").await;
    assert_eq!(delivered_bodies(&backup), seqs(0..10));

    // Up again: a new request goes straight through, after the backlog.
    assert_eq!(d.post("/s", seq(10)).await.status, 200);
    assert_eq!(delivered_bodies(&backup), seqs(0..11));
    assert_eq!(d.target_result("backup", "delivered").await, 11.0);
    assert_eq!(d.target_result("backup", "spooled").await, 10.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_down_target_gets_no_connection_for_new_requests_while_it_honours_retry_after() {
    // The live send is refused with a request for a 30 s pause; then 200.
    let primary = sink_scripted([Behavior::RetryAfter(503, 30)]).await;
    let conf = Conf::new()
        .target("primary", &primary.url())
        .retry("max_backoff = \"60s\"");
    let d = Daemon::start(&conf).await;
    let pausing = async || {
        d.target_status("primary").await["next_attempt_in_seconds"]
            .as_u64()
            .is_some_and(|s| s >= 20)
    };
    // Requests `seqs` are spooled, and the target sees nothing new.
    let spooled_untouched = async |seqs: std::ops::Range<usize>, why: &str| {
        for i in seqs {
            assert_eq!(d.post("/r", seq(i)).await.status, 202);
        }
        assert_eq!(primary.received().len(), 1, "{why}");
    };

    assert_eq!(d.post("/r", seq(0)).await.status, 202);
    d.wait_state("primary", "down").await;
    // The worker's first probe waits for the Retry-After too: /status shows
    // its pause, and the target has seen nothing but the live send.
    wait_for("the worker to back off for the Retry-After", pausing).await;
    assert_eq!(
        primary.received().len(),
        1,
        "the worker probed before the target's Retry-After passed"
    );

    spooled_untouched(
        1..5,
        "a down target was contacted before its Retry-After passed",
    )
    .await;
    assert_eq!(d.target_result("primary", "spooled").await, 5.0);
    assert_eq!(d.target_status("primary").await["buffer_records"], 5);

    // A reload that leaves the target as it was keeps the pause.
    d.reload(&conf).await.unwrap();
    assert!(
        pausing().await,
        "a reload that changed nothing cut the Retry-After short"
    );
    spooled_untouched(
        5..7,
        "a down target was contacted after a reload that changed nothing",
    )
    .await;

    // A change to the target ends the pause early (documented in
    // target.rs): the target now answers 200 and the backlog goes out in
    // order.
    d.reload(&conf.clone().target_line("primary", "timeout = \"6s\""))
        .await
        .unwrap();
    wait_for("the backlog", async || primary.delivered_count() == 7).await;
    d.wait_drained("primary").await;
    assert_eq!(delivered_bodies(&primary), seqs(0..7));
    assert!(d.target_status("primary").await["next_attempt_in_seconds"].is_null());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_passive_target_still_drains_the_spool_it_has() {
    let primary = sink().await;
    let mut backup = stopped_sink().await;
    let d = Daemon::start(&Conf::pair(&primary, &backup).active_passive("backup")).await;

    for i in 0..3 {
        assert_eq!(d.post("/p", seq(i)).await.status, 202);
    }
    assert_eq!(d.target_status("backup").await["buffer_records"], 3);
    assert_eq!(d.switch("primary", None).await.status, 200);
    assert_eq!(d.post("/p", seq(3)).await.status, 200);

    backup.restart().await.unwrap();
    wait_for("the passive backup to drain", async || {
        backup.delivered_count() == 3
    })
    .await;
    d.wait_drained("backup").await;

    assert_eq!(delivered_bodies(&backup), seqs(0..3));
    assert_eq!(delivered_bodies(&primary), vec![seq(3)]);
    let st = d.target_status("backup").await;
    assert_eq!(st["selected"], false, "{st}");
    assert_eq!(
        d.metric("forkd_target_selected", &[("target", "backup")])
            .await,
        0.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_that_never_answers_never_blocks_delivery_to_the_other() {
    let primary = sink().await;
    let backup = sink_with(Behavior::Hang).await;
    let mut d = Daemon::start(
        &Conf::pair(&primary, &backup)
            .routing("secondary_wait = \"100ms\"")
            .target_line("backup", "timeout = \"60s\""),
    )
    .await;

    for i in 0..5 {
        let r = d.post("/i", seq(i)).await;
        assert_eq!(r.status, 200, "request {i}: {}", r.text());
    }

    assert_eq!(delivered_bodies(&primary), seqs(0..5));
    assert_eq!(d.target_result("backup", "spooled").await, 5.0);
    assert_eq!(d.target_status("backup").await["buffer_records"], 5);
    // Only the first live copy and the worker's replay of it ever reached the
    // backup: later copies went to the spool without a connection attempt.
    assert!(
        backup.received().len() <= 2,
        "{} attempts reached a target that is not up",
        backup.received().len()
    );
    assert_ne!(d.state("backup").await, "up");
    d.shutdown().await;
}

// -------------------------------------------------------------------- order

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_spooled_across_an_outage_and_a_restart_arrive_in_acceptance_order_then_live_ones()
{
    let primary = sink().await;
    let mut backup = stopped_sink().await;
    let mut d = Daemon::start(
        &Conf::pair(&primary, &backup)
            .buffer("drain_concurrency = 1")
            .buffer("fsync = \"always\""),
    )
    .await;

    for i in 0..100 {
        assert_eq!(d.post("/o", seq(i)).await.status, 200);
    }
    // forkd restarts in the middle of the outage.
    d.restart().await;
    assert_ne!(d.state("backup").await, "up", "a backlog is not up");
    for i in 100..200 {
        assert_eq!(d.post("/o", seq(i)).await.status, 200);
    }
    assert_eq!(d.target_status("backup").await["buffer_records"], 200);

    backup.restart().await.unwrap();
    wait_for("200 replays", async || backup.delivered_count() == 200).await;
    d.wait_drained("backup").await;
    for i in 200..203 {
        assert_eq!(d.post("/o", seq(i)).await.status, 200);
    }

    assert_eq!(delivered_bodies(&backup), seqs(0..203));
    assert_eq!(delivered_bodies(&primary), seqs(0..203));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_a_wider_drain_window_every_spooled_request_arrives_reordered_at_most_within_it() {
    const WINDOW: usize = 4;
    let primary = sink().await;
    let mut backup = stopped_sink().await;
    let d = Daemon::start(
        &Conf::pair(&primary, &backup)
            .target_buffer("backup", &format!("drain_concurrency = {WINDOW}")),
    )
    .await;

    for i in 0..40 {
        assert_eq!(d.post("/w", seq(i)).await.status, 200);
    }
    backup.restart().await.unwrap();
    wait_for("40 replays", async || backup.delivered_count() == 40).await;
    d.wait_drained("backup").await;

    let got = delivered_bodies(&backup);
    let mut sorted = got.clone();
    sorted.sort();
    assert_eq!(sorted, seqs(0..40), "lost or duplicated records");
    for (pos, body) in got.iter().enumerate() {
        let n: usize = body.trim_start_matches("seq-").parse().unwrap();
        assert!(
            n.abs_diff(pos) < WINDOW,
            "{body} arrived at position {pos}, outside a window of {WINDOW}: {got:?}"
        );
    }
}

// --------------------------------------------------------------- duplicates

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_attempt_cut_after_the_body_was_sent_is_replayed_with_the_same_request_id() {
    let primary = sink_scripted([Behavior::CloseMidAnswer]).await;
    let d = Daemon::start(&Conf::new().target("primary", &primary.url())).await;

    let r = d.post("/dup", "maybe twice").await;
    assert_eq!(r.status, 202, "{}", r.text());
    let id = r.header("x-request-id").unwrap();

    wait_for("the replay", async || primary.delivered_count() == 1).await;
    let got = primary.received();
    assert_eq!(got.len(), 2, "the cut attempt and its replay");
    for a in &got {
        assert_eq!(a.body, "maybe twice");
        assert_eq!(a.headers["x-request-id"], id.as_str());
    }
    assert_eq!(
        d.metric(
            "forkd_target_attempt_failures_total",
            &[("target", "primary"), ("reason", "io")]
        )
        .await,
        1.0
    );
}
