#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! SPEC.md "Admin endpoints" and "Metrics".

use std::collections::BTreeSet;

use forkd::sink::Behavior;
use http::Method;

use crate::common::*;

fn keys(v: &serde_json::Value) -> BTreeSet<String> {
    v.as_object()
        .unwrap_or_else(|| panic!("not an object: {v}"))
        .keys()
        .cloned()
        .collect()
}

fn set(names: &[&str]) -> BTreeSet<String> {
    names.iter().map(|s| (*s).to_owned()).collect()
}

// ------------------------------------------------------------------- admin

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn healthz_and_readyz_answer_200_once_started() {
    let primary = sink().await;
    let d = Daemon::start(&Conf::new().target("primary", &primary.url())).await;

    for path in ["/healthz", "/readyz"] {
        let r = d.admin(Method::GET, path, "", None).await;
        assert_eq!(r.status, 200, "{path}: {}", r.text());
    }
    assert_eq!(d.admin(Method::GET, "/nope", "", None).await.status, 404);
    let r = d.admin(Method::POST, "/status", "", None).await;
    assert_eq!(r.status, 405);
    assert_eq!(r.header("allow").as_deref(), Some("GET"));
    let r = d.admin(Method::GET, "/admin/active", "", None).await;
    assert_eq!(r.status, 405);
    assert!(d.running().control.ready());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn status_has_the_documented_shape_and_shows_urls_without_their_query() {
    let primary = sink().await;
    let backup = sink().await;
    let d = Daemon::start(&Conf::new().target("primary", &primary.url()).target(
        "backup",
        &format!("{}/blob?sig=secret-sas-token&sv=1", backup.url()),
    ))
    .await;

    let r = d.admin(Method::GET, "/status", "", None).await;
    assert_eq!(r.status, 200);
    assert!(
        r.header("content-type")
            .unwrap()
            .starts_with("application/json"),
        "{:?}",
        r.header("content-type")
    );
    assert!(!r.text().contains("secret-sas-token"), "{}", r.text());
    let st: serde_json::Value = serde_json::from_slice(&r.body).unwrap();

    assert_eq!(
        keys(&st),
        set(&["mode", "active", "active_source", "targets"])
    );
    assert_eq!(st["mode"], "active-active");
    assert_eq!(st["active"], "primary");
    assert_eq!(st["active_source"], "config");
    assert_eq!(keys(&st["targets"]), set(&["primary", "backup"]));
    for (name, sink) in [("primary", &primary), ("backup", &backup)] {
        let t = &st["targets"][name];
        assert_eq!(
            keys(t),
            set(&[
                "state",
                "selected",
                "buffer_bytes",
                "buffer_records",
                "oldest_record_age_seconds",
                "url",
                "next_attempt_in_seconds"
            ]),
            "{name}"
        );
        assert_eq!(t["state"], "up");
        assert_eq!(t["selected"], true);
        assert_eq!(t["buffer_bytes"], 0);
        assert_eq!(t["buffer_records"], 0);
        assert_eq!(t["oldest_record_age_seconds"], 0);
        assert!(t["next_attempt_in_seconds"].is_null(), "{t}");
        let url = t["url"].as_str().unwrap();
        assert!(url.starts_with(&sink.url()), "{name}: {url}");
        assert!(!url.contains('?'), "{name}: {url}");
    }
    assert!(
        st["targets"]["backup"]["url"]
            .as_str()
            .unwrap()
            .contains("/blob")
    );
}

// ----------------------------------------------------------------- metrics

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn every_documented_series_is_exported_at_zero_from_the_start() {
    let primary = sink().await;
    let backup = sink().await;
    let d = Daemon::start(&Conf::pair(&primary, &backup)).await;
    let m = d.metrics().await;
    let zero = |name: &str, labels: &[(&str, &str)]| {
        assert_eq!(m.get(name, labels), Some(0.0), "{name}{labels:?}\n{}", m.0);
    };

    for t in ["primary", "backup"] {
        for result in ["delivered", "spooled", "rejected", "dropped"] {
            zero(
                "forkd_target_requests_total",
                &[("target", t), ("result", result)],
            );
        }
        zero("forkd_target_delivered_bytes_total", &[("target", t)]);
        for reason in ["connect", "timeout", "status", "io", "tls"] {
            zero(
                "forkd_target_attempt_failures_total",
                &[("target", t), ("reason", reason)],
            );
        }
        assert_eq!(m.get("forkd_target_up", &[("target", t)]), Some(1.0));
        assert_eq!(
            m.get("forkd_target_state", &[("target", t), ("state", "up")]),
            Some(1.0)
        );
        zero("forkd_target_state", &[("target", t), ("state", "down")]);
        zero(
            "forkd_target_state",
            &[("target", t), ("state", "draining")],
        );
        assert_eq!(m.get("forkd_target_selected", &[("target", t)]), Some(1.0));
        for path in ["live", "replay"] {
            zero(
                "forkd_target_latency_seconds_count",
                &[("target", t), ("path", path)],
            );
            zero(
                "forkd_target_latency_seconds_sum",
                &[("target", t), ("path", path)],
            );
        }
        zero("forkd_buffer_bytes", &[("target", t)]);
        zero("forkd_buffer_records", &[("target", t)]);
        zero("forkd_buffer_oldest_record_age_seconds", &[("target", t)]);
        for reason in ["full", "corrupt"] {
            zero(
                "forkd_buffer_dropped_records_total",
                &[("target", t), ("reason", reason)],
            );
        }
    }
    zero("forkd_config_reloads_total", &[("result", "success")]);
    zero("forkd_config_reloads_total", &[("result", "failure")]);
    zero("forkd_request_bytes_total", &[]);
    // forkd_requests_total{status} has no known label value before the
    // first answer (checked in requests_and_request_bytes_are_counted...).
    for (line, kind) in [
        ("forkd_request_bytes_total", "counter"),
        ("forkd_target_requests_total", "counter"),
        ("forkd_target_delivered_bytes_total", "counter"),
        ("forkd_target_attempt_failures_total", "counter"),
        ("forkd_target_up", "gauge"),
        ("forkd_target_state", "gauge"),
        ("forkd_target_selected", "gauge"),
        ("forkd_target_latency_seconds", "histogram"),
        ("forkd_buffer_bytes", "gauge"),
        ("forkd_buffer_records", "gauge"),
        ("forkd_buffer_oldest_record_age_seconds", "gauge"),
        ("forkd_buffer_dropped_records_total", "counter"),
        ("forkd_config_reloads_total", "counter"),
        ("forkd_build_info", "gauge"),
    ] {
        assert!(
            m.contains(&format!("# TYPE {line} {kind}\n")),
            "{line} is not a {kind}"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn build_info_carries_the_version() {
    let primary = sink().await;
    let d = Daemon::start(&Conf::new().target("primary", &primary.url())).await;
    assert_eq!(
        d.metric(
            "forkd_build_info",
            &[("version", env!("CARGO_PKG_VERSION"))]
        )
        .await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn requests_and_request_bytes_are_counted_by_the_status_sent() {
    let primary = sink_scripted([Behavior::Status(200), Behavior::Status(201)]).await;
    let d = Daemon::start(&Conf::new().target("primary", &primary.url())).await;

    assert_eq!(d.post("/a", "12345").await.status, 200);
    assert_eq!(d.post("/b", "123").await.status, 201);
    assert_eq!(d.post("/c", "1").await.status, 200);
    let r = d
        .send(
            http::Request::delete("/d")
                .body(http_body_util::Full::default())
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 405);

    let m = d.metrics().await;
    assert!(m.contains("# TYPE forkd_requests_total counter\n"));
    assert_eq!(
        m.get("forkd_requests_total", &[("status", "200")]),
        Some(2.0)
    );
    assert_eq!(
        m.get("forkd_requests_total", &[("status", "201")]),
        Some(1.0)
    );
    assert_eq!(
        m.get("forkd_requests_total", &[("status", "405")]),
        Some(1.0)
    );
    assert_eq!(m.get("forkd_request_bytes_total", &[]), Some(9.0));
    assert_eq!(
        m.get(
            "forkd_target_delivered_bytes_total",
            &[("target", "primary")]
        ),
        Some(9.0)
    );
    assert_eq!(
        m.get(
            "forkd_target_latency_seconds_count",
            &[("target", "primary"), ("path", "live")]
        ),
        Some(3.0)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_spooled_copy_counts_once_as_spooled_then_once_as_delivered_and_the_buffer_gauges_follow()
{
    let primary = sink().await;
    let mut backup = stopped_sink().await;
    let d = Daemon::start(&Conf::pair(&primary, &backup)).await;

    for body in ["one", "two", "three"] {
        assert_eq!(d.post("/g", body).await.status, 200);
    }
    let m = d.metrics().await;
    let backup_series = |name: &str| m.get(name, &[("target", "backup")]).unwrap();
    let spooled = m.get(
        "forkd_target_requests_total",
        &[("target", "backup"), ("result", "spooled")],
    );
    assert_eq!(spooled, Some(3.0));
    assert_eq!(
        m.get(
            "forkd_target_requests_total",
            &[("target", "backup"), ("result", "delivered")]
        ),
        Some(0.0)
    );
    assert_eq!(backup_series("forkd_buffer_records"), 3.0);
    assert!(backup_series("forkd_buffer_bytes") > 11.0);
    assert_eq!(backup_series("forkd_target_up"), 0.0);
    assert!(backup_series("forkd_buffer_oldest_record_age_seconds") >= 0.0);
    assert!(
        m.get(
            "forkd_target_attempt_failures_total",
            &[("target", "backup"), ("reason", "connect")]
        )
        .unwrap()
            >= 1.0
    );
    let st = d.target_status("backup").await;
    assert_eq!(st["buffer_records"], 3);
    assert!(st["buffer_bytes"].as_u64().unwrap() > 11, "{st}");

    backup.restart().await.unwrap();
    d.wait_drained("backup").await;

    let m = d.metrics().await;
    let backup_series = |name: &str| m.get(name, &[("target", "backup")]).unwrap();
    let result = |r: &str| {
        m.get(
            "forkd_target_requests_total",
            &[("target", "backup"), ("result", r)],
        )
        .unwrap()
    };
    assert_eq!(result("spooled"), 3.0, "spooled is counted once");
    assert_eq!(result("delivered"), 3.0, "delivered once more on replay");
    assert_eq!(backup_series("forkd_buffer_records"), 0.0);
    assert_eq!(backup_series("forkd_buffer_bytes"), 0.0);
    assert_eq!(backup_series("forkd_buffer_oldest_record_age_seconds"), 0.0);
    assert_eq!(backup_series("forkd_target_up"), 1.0);
    assert_eq!(backup_series("forkd_target_delivered_bytes_total"), 11.0);
    assert!(
        m.get(
            "forkd_target_latency_seconds_count",
            &[("target", "backup"), ("path", "replay")]
        )
        .unwrap()
            >= 3.0
    );
    assert_eq!(delivered_bodies(&backup), ["one", "two", "three"]);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn failed_attempts_are_counted_by_reason() {
    let refused = stopped_sink().await;
    let hangs = sink_with(Behavior::Hang).await;
    let unavailable = sink_with(Behavior::Status(503)).await;
    let cut = sink_with(Behavior::CloseMidAnswer).await;
    let d = Daemon::start(
        &Conf::new()
            .target("primary", &unavailable.url())
            .target("connect", &refused.url())
            .target("timeout", &hangs.url())
            .target_line("timeout", "timeout = \"200ms\"")
            .target("io", &cut.url())
            .routing("secondary_wait = \"5s\""),
    )
    .await;

    let r = d.post("/f", "x").await;
    assert_eq!(r.status, 202, "{}", r.text());

    for (target, reason) in [
        ("connect", "connect"),
        ("timeout", "timeout"),
        ("primary", "status"),
        ("io", "io"),
    ] {
        let n = d
            .metric(
                "forkd_target_attempt_failures_total",
                &[("target", target), ("reason", reason)],
            )
            .await;
        assert!(n >= 1.0, "{target}: no {reason} failure counted");
        assert_eq!(d.target_result(target, "spooled").await, 1.0, "{target}");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admin_post_whose_body_never_comes_gets_408_instead_of_holding_its_connection() {
    // A request in the service keeps its connection from the idle sweep;
    // the admin listener has few connection slots.
    let d = Daemon::start(&Conf::new().target("primary", &sink().await.url())).await;
    let mut s = connect(d.running().admin_addr).await;
    write_all(
        &mut s,
        b"POST /admin/active HTTP/1.1\r\nHost: forkd\r\nContent-Length: 20\r\n\r\n{",
    )
    .await;
    let mut buf = Vec::new();
    let head = read_head(&mut s, &mut buf).await;
    assert_eq!(head_status(&head), 408, "{head}");
    assert_eq!(d.status().await["active"], "primary");
}
