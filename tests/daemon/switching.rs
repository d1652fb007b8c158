#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! SPEC.md "Switching and reload" and "Shutdown".

use bytes::Bytes;
use forkd::sink::{Behavior, Sink};
use http::{Method, Request};
use http_body_util::Full;

use crate::common::*;

/// Active-passive: a primary that never answers (its copies fail after
/// `timeout`) and a healthy backup. The config returned has no routing.
async fn primary_that_hangs_for(timeout: &str) -> (Sink, Sink, Conf, Daemon) {
    let hang = sink_with(Behavior::Hang).await;
    let backup = sink().await;
    let conf = Conf::new()
        .target("primary", &hang.url())
        .target_line("primary", &format!("timeout = \"{timeout}\""))
        .target("backup", &backup.url());
    let d = Daemon::start(&conf.clone().active_passive("primary")).await;
    (hang, backup, conf, d)
}

/// POSTs `path` in a task, once `hang` has the request (it never answers).
async fn post_held_by(d: &Daemon, path: &str, hang: &Sink) -> tokio::task::JoinHandle<Reply> {
    let client = d.client.clone();
    let req = Request::post(d.url(path))
        .body(Full::new(Bytes::from(path.to_owned())))
        .unwrap();
    let seen = hang.received().len();
    let task = tokio::spawn(async move { send(&client, req).await });
    wait_for("the request to reach the hanging target", async || {
        hang.received().len() > seen
    })
    .await;
    task
}

fn bodies(s: &forkd::sink::Sink) -> Vec<String> {
    delivered_bodies(s)
}

// ---------------------------------------------------------------- switching

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_switch_routes_new_requests_to_the_new_active_is_saved_and_survives_a_reload() {
    let primary = sink().await;
    let backup = sink().await;
    let conf = Conf::pair(&primary, &backup).active_passive("primary");
    let d = Daemon::start(&conf).await;
    let state_file = d.buffer_dir().join("routing.state");

    assert_eq!(d.post("/a", "before").await.status, 200);
    let r = d.switch("backup", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(state_file.exists(), "the switch is not saved");
    assert_eq!(d.post("/a", "after").await.status, 200);
    assert_eq!(bodies(&primary), ["before"]);
    assert_eq!(bodies(&backup), ["after"]);

    let st = d.status().await;
    assert_eq!(st["active"], "backup");
    assert_eq!(st["active_source"], "admin");
    assert_eq!(st["targets"]["backup"]["selected"], true);
    assert_eq!(st["targets"]["primary"]["selected"], false);
    let m = d.metrics().await;
    assert_eq!(
        m.get("forkd_target_selected", &[("target", "backup")]),
        Some(1.0)
    );
    assert_eq!(
        m.get("forkd_target_selected", &[("target", "primary")]),
        Some(0.0)
    );

    // A reload of a config that still says "primary" keeps the switch.
    d.reload(&conf).await.unwrap();
    let st = d.status().await;
    assert_eq!(
        (st["active"].as_str(), st["active_source"].as_str()),
        (Some("backup"), Some("admin"))
    );
    assert_eq!(d.post("/a", "after reload").await.status, 200);
    assert_eq!(bodies(&backup), ["after", "after reload"]);

    // DELETE: the config's active target rules again.
    let r = d.admin(Method::DELETE, "/admin/active", "", None).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert!(!state_file.exists(), "the saved switch is still on disk");
    let st = d.status().await;
    assert_eq!(st["active"], "primary");
    assert_eq!(st["active_source"], "config");
    assert_eq!(d.post("/a", "cleared").await.status, 200);
    assert_eq!(bodies(&primary), ["before", "cleared"]);
    assert_eq!(backup.received().len(), 2);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn switching_to_an_unknown_target_gets_404_and_changes_nothing() {
    let primary = sink().await;
    let backup = sink().await;
    let d = Daemon::start(&Conf::pair(&primary, &backup).active_passive("primary")).await;

    let r = d.switch("nowhere", None).await;
    assert_eq!(r.status, 404, "{}", r.text());
    let r = d
        .admin(
            Method::POST,
            "/admin/active",
            "{\"tagret\":\"backup\"}",
            None,
        )
        .await;
    assert_eq!(r.status, 400, "a malformed switch: {}", r.text());

    let st = d.status().await;
    assert_eq!(st["active"], "primary");
    assert_eq!(st["active_source"], "config");
    assert!(!d.buffer_dir().join("routing.state").exists());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn with_an_admin_token_switching_needs_the_token() {
    let primary = sink().await;
    let backup = sink().await;
    let d = Daemon::start(
        &Conf::pair(&primary, &backup)
            .active_passive("primary")
            .admin("token = \"adm-s3cret\""),
    )
    .await;

    assert_eq!(d.switch("backup", None).await.status, 401);
    assert_eq!(d.switch("backup", Some("wrong")).await.status, 401);
    assert_eq!(d.status().await["active"], "primary");

    assert_eq!(d.switch("backup", Some("adm-s3cret")).await.status, 200);
    assert_eq!(d.status().await["active"], "backup");

    let del = async |token: Option<&str>| {
        d.admin(Method::DELETE, "/admin/active", "", token)
            .await
            .status
    };
    assert_eq!(del(None).await, 401);
    assert_eq!(d.status().await["active"], "backup");
    assert_eq!(del(Some("adm-s3cret")).await, 200);
    assert_eq!(d.status().await["active"], "primary");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_restart_keeps_the_admin_switch() {
    let primary = sink().await;
    let backup = sink().await;
    let mut d = Daemon::start(&Conf::pair(&primary, &backup).active_passive("primary")).await;
    assert_eq!(d.switch("backup", None).await.status, 200);

    d.restart().await;

    let st = d.status().await;
    assert_eq!(st["active"], "backup");
    assert_eq!(st["active_source"], "admin");
    assert_eq!(d.post("/r", "after restart").await.status, 200);
    assert_eq!(bodies(&backup), ["after restart"]);
    assert!(primary.received().is_empty());
}

// ------------------------------------------------------------------- reload

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_config_on_reload_is_refused_and_the_old_one_keeps_serving() {
    let primary = sink().await;
    let backup = sink().await;
    let conf = Conf::pair(&primary, &backup);
    let d = Daemon::start(&conf).await;

    // An unknown key.
    std::fs::write(
        &d.config_path,
        conf.render(&d.buffer_dir()) + "\n[bogus]\nkey = 1\n",
    )
    .unwrap();
    assert!(d.running().control.reload().await.is_err());
    // Well-formed, but the active target does not exist.
    let err = d
        .reload(&conf.clone().routing("active = \"nowhere\""))
        .await
        .unwrap_err();
    assert!(err.contains("routing.active"), "{err}");

    let m = d.metrics().await;
    assert_eq!(
        m.get("forkd_config_reloads_total", &[("result", "failure")]),
        Some(2.0)
    );
    assert_eq!(
        m.get("forkd_config_reloads_total", &[("result", "success")]),
        Some(0.0)
    );
    assert_eq!(d.post("/still", "served").await.status, 200);
    assert_eq!(bodies(&primary), ["served"]);
    assert_eq!(bodies(&backup), ["served"]);
    assert_eq!(d.status().await["active"], "primary");

    d.reload(&conf).await.unwrap();
    assert_eq!(
        d.metric("forkd_config_reloads_total", &[("result", "success")])
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_added_by_reload_receives_forked_requests_and_has_metric_series() {
    let primary = sink().await;
    let extra = sink().await;
    let conf = Conf::new().target("primary", &primary.url());
    let d = Daemon::start(&conf).await;
    assert!(!d.metrics().await.contains("target=\"extra\""));

    d.reload(&conf.clone().target("extra", &extra.url()))
        .await
        .unwrap();
    let m = d.metrics().await;
    assert_eq!(
        m.get(
            "forkd_target_state",
            &[("target", "extra"), ("state", "up")]
        ),
        Some(1.0)
    );
    assert_eq!(
        m.get(
            "forkd_target_requests_total",
            &[("target", "extra"), ("result", "dropped")]
        ),
        Some(0.0)
    );

    assert_eq!(d.post("/n", "to both").await.status, 200);
    assert_eq!(bodies(&extra), ["to both"]);
    assert_eq!(bodies(&primary), ["to both"]);
    assert_eq!(d.target_result("extra", "delivered").await, 1.0);
    assert_eq!(d.target_status("extra").await["state"], "up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_refused_because_a_new_target_cannot_open_its_spool_changes_no_running_target() {
    let primary = sink().await;
    let moved = sink().await;
    let extra = sink().await;
    let conf = Conf::new().target("primary", &primary.url());
    let d = Daemon::start(&conf).await;
    // The new target's spool directory cannot be made: a file is in the way.
    std::fs::write(d.buffer_dir().join("extra"), b"not a directory").unwrap();

    // One reload both moves the running target and adds the one that fails.
    let err = d
        .reload(
            &Conf::new()
                .target("primary", &moved.url())
                .target("extra", &extra.url()),
        )
        .await
        .unwrap_err();
    assert!(err.contains("extra"), "{err}");

    assert_eq!(d.post("/r", "after the refused reload").await.status, 200);
    assert_eq!(
        bodies(&primary),
        ["after the refused reload"],
        "a refused reload changed a running target"
    );
    assert!(bodies(&moved).is_empty());
    assert!(bodies(&extra).is_empty());
    assert!(!d.metrics().await.contains("target=\"extra\""));
    assert_eq!(
        d.metric("forkd_config_reloads_total", &[("result", "failure")])
            .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_removed_by_reload_keeps_its_spool_on_disk_and_loses_its_metric_series() {
    let primary = sink().await;
    let mut backup = stopped_sink().await;
    let conf = Conf::pair(&primary, &backup);
    let d = Daemon::start(&conf).await;
    for i in 0..2 {
        assert_eq!(d.post("/x", format!("kept-{i}")).await.status, 200);
    }
    assert_eq!(d.target_status("backup").await["buffer_records"], 2);

    d.reload(&conf.clone().remove_target("backup"))
        .await
        .unwrap();

    let m = d.metrics().await;
    assert!(
        !m.contains("target=\"backup\""),
        "series of a removed target are still exported:\n{}",
        m.0
    );
    let st = d.status().await;
    assert!(st["targets"].get("backup").is_none(), "{st}");
    assert!(d.buffer_dir().join("backup").is_dir());
    assert_eq!(d.inspect("backup").records, 2);
    assert_eq!(d.post("/x", "primary only").await.status, 200);
    assert_eq!(primary.received().len(), 3);

    // Added back, it reopens its spool (the lock was released) and drains it.
    backup.restart().await.unwrap();
    d.reload(&conf).await.unwrap();
    wait_for("the re-added backup to drain", async || {
        backup.delivered_count() == 2
    })
    .await;
    assert_eq!(bodies(&backup), ["kept-0", "kept-1"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_that_moves_a_draining_target_sends_each_replay_with_one_configs_url_and_headers()
{
    // A reload in the middle of a replay batch: the rest of the batch goes
    // to the new URL with the new headers, never to the new host with the
    // old credentials (or the old `Host`).
    let mut old = stopped_sink().await;
    let new = sink().await;
    let conf = |url: &str, token: &str| {
        Conf::new().target("primary", url).target_line(
            "primary",
            &format!("headers = {{ Authorization = \"Bearer {token}\" }}"),
        )
    };
    let d = Daemon::start(&conf(&old.url(), "old-token")).await;
    for i in 0..40 {
        assert_eq!(d.post("/r", format!("r{i}")).await.status, 202);
    }
    old.set_default(Behavior::Delay(std::time::Duration::from_millis(25), 200));
    old.restart().await.unwrap();
    wait_for("replays to reach the old URL", async || {
        old.delivered_count() >= 3
    })
    .await;

    d.reload(&conf(&new.url(), "new-token")).await.unwrap();
    wait_for("the backlog to be delivered", async || {
        d.target_status("primary").await["buffer_records"] == 0
    })
    .await;

    let (at_old, at_new) = (old.received(), new.received());
    assert!(
        !at_new.is_empty(),
        "the reload came after the whole backlog"
    );
    for r in &at_old {
        assert_eq!(r.headers["authorization"], "Bearer old-token");
    }
    let new_host = new.addr().to_string();
    for r in &at_new {
        assert_eq!(
            r.headers["authorization"], "Bearer new-token",
            "a replay went to the new host with the old config's headers"
        );
        assert_eq!(r.headers["host"], new_host.as_str());
    }
    // Every record arrived, in order across the two hosts.
    let mut all: Vec<String> = delivered_bodies(&old);
    all.extend(delivered_bodies(&new));
    all.dedup();
    let expected: Vec<String> = (0..40).map(|i| format!("r{i}")).collect();
    assert_eq!(all, expected);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_removed_by_reload_keeps_its_spool_open_for_the_requests_in_flight() {
    // The request in flight hangs at the primary (3 s timeout), so its copy
    // is spooled there after the reload that removes the primary: it
    // finishes under the routing it started with, and is not refused.
    let (hang, backup, conf, d) = primary_that_hangs_for("3s").await;
    let in_flight = post_held_by(&d, "/in-flight", &hang).await;

    d.reload(
        &conf
            .clone()
            .remove_target("primary")
            .active_passive("backup"),
    )
    .await
    .unwrap();
    // The reload does not wait for it (nor would a shutdown or a switch).
    assert!(
        !in_flight.is_finished(),
        "the reload waited for the request in flight"
    );

    let r = in_flight.await.unwrap();
    assert_eq!(r.status, 202, "{}", r.text());
    assert_eq!(
        d.inspect("primary").records,
        1,
        "the in-flight copy was not spooled"
    );
    assert_eq!(d.post("/after", "to the backup").await.status, 200);
    assert_eq!(bodies(&backup), ["to the backup"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_target_added_back_while_a_request_still_holds_its_old_spool_is_refused_then_reopens_it()
{
    let (hang, _backup, conf, d) = primary_that_hangs_for("4s").await;
    let (removed, added_back) = (
        conf.clone()
            .remove_target("primary")
            .active_passive("backup"),
        conf.clone().active_passive("backup"),
    );
    let in_flight = post_held_by(&d, "/held", &hang).await;
    d.reload(&removed).await.unwrap();

    // Its old spool is open (and locked) while the request holds it.
    let err = d.reload(&added_back).await.unwrap_err();
    assert!(err.contains("still open"), "{err}");

    assert_eq!(in_flight.await.unwrap().status, 202);
    // Once the request is done, the old spool is closed before the target
    // leaves the retiring list: one reload opens it again.
    d.reload(&added_back).await.unwrap();
    assert_eq!(d.target_status("primary").await["buffer_records"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_can_change_the_mode_and_the_active_target() {
    let primary = sink().await;
    let backup = sink().await;
    let base = Conf::pair(&primary, &backup);
    let d = Daemon::start(&base.clone().active_passive("primary")).await;

    assert_eq!(d.post("/m", "ap").await.status, 200);
    d.reload(&base.clone().routing("mode = \"active-active\""))
        .await
        .unwrap();
    assert_eq!(d.status().await["mode"], "active-active");
    assert_eq!(d.post("/m", "aa").await.status, 200);
    d.reload(&base.clone().active_passive("backup"))
        .await
        .unwrap();
    let st = d.status().await;
    assert_eq!(
        (st["mode"].as_str(), st["active"].as_str()),
        (Some("active-passive"), Some("backup"))
    );
    assert_eq!(d.post("/m", "ap-backup").await.status, 200);

    assert_eq!(bodies(&primary), ["ap", "aa"]);
    assert_eq!(bodies(&backup), ["aa", "ap-backup"]);
}

// ----------------------------------------------------------------- shutdown

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn at_the_shutdown_bound_copies_still_waiting_for_a_target_are_spooled_and_delivered_after_restart()
 {
    // The primary never answers within the shutdown bound (its timeout is
    // far longer), the backup answers at once.
    let mut primary = sink_with(Behavior::Hang).await;
    let backup = sink().await;
    let conf = Conf::pair(&primary, &backup)
        .server("shutdown_timeout = \"1s\"")
        .target_line("primary", "timeout = \"60s\"");
    let mut d = Daemon::start(&conf).await;

    let status = shut_down_with_a_request_at(&mut d, &primary, "/held", "held at shutdown").await;

    // Answered, not cut off: the active copy was spooled, so the backup's
    // answer is relayed.
    assert_eq!(status, 200);
    assert_eq!(bodies(&backup), ["held at shutdown"]);

    primary.set_default(Behavior::Status(200));
    primary.restart().await.unwrap();
    d.boot().await;
    wait_for("the spooled copy", async || primary.delivered_count() == 1).await;
    assert_eq!(bodies(&primary), ["held at shutdown"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn shutdown_lets_an_in_flight_request_finish_and_a_restart_reopens_the_spools() {
    let primary = sink_with(Behavior::Delay(std::time::Duration::from_millis(700), 201)).await;
    let mut backup = stopped_sink().await;
    let mut d = Daemon::start(&Conf::pair(&primary, &backup)).await;

    let status = shut_down_with_a_request_at(&mut d, &primary, "/slow", "in flight").await;
    assert_eq!(status, 201);

    d.boot().await;
    assert_eq!(d.target_status("backup").await["buffer_records"], 1);
    backup.restart().await.unwrap();
    wait_for("the spooled copy", async || backup.delivered_count() == 1).await;
    assert_eq!(bodies(&backup), ["in flight"]);
}

/// A client still sending its body when the shutdown bound passes keeps
/// its connection; if the body completes before the process exits, the
/// spools are already closed. Acknowledging it then would lose the backup's
/// copy: it is refused instead (and sent nowhere), so the client retries.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_body_completes_after_shutdown_is_refused_not_acknowledged() {
    let primary = sink().await;
    let backup = stopped_sink().await;
    let conf = Conf::pair(&primary, &backup).server("shutdown_timeout = \"1s\"");
    let mut d = Daemon::start(&conf).await;
    let mut s = connect(d.running().addr).await;
    write_all(
        &mut s,
        b"POST /late HTTP/1.1\r\nhost: forkd\r\nx-request-id: late\r\ncontent-length: 10\r\nexpect: 100-continue\r\n\r\n",
    )
    .await;
    // The 100 proves forkd is reading the body.
    let mut buf = Vec::new();
    let head = read_head(&mut s, &mut buf).await;
    assert_eq!(head_status(&head), 100, "{head}");
    write_all(&mut s, b"half-").await;
    d.shutdown().await;

    write_all(&mut s, b"body!").await;
    let head = read_head(&mut s, &mut buf).await;
    assert_eq!(head_status(&head), 503, "{head}");
    assert!(
        primary.received().is_empty(),
        "a refused request was sent to the primary"
    );
}

/// Shuts forkd down while a POST to `path` is at `primary` (sent from a
/// task of its own, awaited once the shutdown is done), and returns the
/// status the client got: a request in flight must be answered, not cut off.
async fn shut_down_with_a_request_at(
    d: &mut Daemon,
    primary: &Sink,
    path: &str,
    body: &'static str,
) -> http::StatusCode {
    let client = d.client.clone();
    let req = Request::post(d.url(path))
        .body(Full::new(Bytes::from(body)))
        .unwrap();
    let in_flight = tokio::spawn(async move { client.request(req).await });
    wait_for("the request to reach the primary", async || {
        primary.received().len() == 1
    })
    .await;
    d.shutdown().await;
    in_flight
        .await
        .unwrap()
        .expect("the in-flight request got no answer")
        .status()
}
