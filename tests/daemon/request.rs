#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! SPEC.md "What a request gets": methods, body, admission, headers and URL,
//! outcomes and the answer; plus h2c and `server.auth_tokens`.

use bytes::Bytes;
use forkd::sink::{Behavior, Sink};
use http::{Method, Request, Version};
use http_body_util::{BodyExt, Full};
use hyper_util::rt::{TokioExecutor, TokioIo};

use crate::common::*;

// ------------------------------------------------------------------ methods

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_post_is_forked_to_both_targets_with_the_same_body() {
    let primary = sink().await;
    let backup = sink().await;
    let d = Daemon::start(&Conf::pair(&primary, &backup)).await;

    let r = d.post("/v1/logs", "hello, both regions").await;

    assert_eq!(r.status, 200, "{}", r.text());
    for s in [&primary, &backup] {
        let got = s.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].method, Method::POST);
        assert_eq!(got[0].path_and_query, "/v1/logs");
        assert_eq!(got[0].body, "hello, both regions");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_put_is_forked_to_both_targets_too() {
    let primary = sink().await;
    let backup = sink().await;
    let d = Daemon::start(&Conf::pair(&primary, &backup)).await;

    let r = d
        .send(
            Request::put("/container/blob")
                .body(Full::new(Bytes::from("blob bytes")))
                .unwrap(),
        )
        .await;

    assert_eq!(r.status, 200, "{}", r.text());
    for s in [&primary, &backup] {
        let got = s.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].method, Method::PUT);
        assert_eq!(got[0].body, "blob bytes");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_get_goes_to_the_active_target_only_is_never_spooled_and_gets_502_when_it_is_down() {
    let mut primary = sink().await;
    let backup = sink().await;
    let d = Daemon::start(&Conf::pair(&primary, &backup)).await;

    let r = d.get("/api/v1/query?query=up").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.text(), "ok\n");
    let head = d
        .send(
            Request::head("/api/v1/status")
                .body(Full::default())
                .unwrap(),
        )
        .await;
    assert_eq!(head.status, 200);
    let got = primary.received();
    assert_eq!(got.len(), 2);
    assert_eq!(got[0].method, Method::GET);
    assert_eq!(got[0].path_and_query, "/api/v1/query?query=up");
    assert_eq!(got[1].method, Method::HEAD);
    assert!(
        backup.received().is_empty(),
        "a GET was forked to the backup"
    );

    // The active target goes away: a POST finds it down (and spools its copy).
    primary.stop().await;
    assert_eq!(d.post("/write", "x").await.status, 200);
    d.wait_state("primary", "down").await;
    let r = d.get("/api/v1/query?query=up").await;
    assert_eq!(r.status, 502);
    let status = d.target_status("primary").await;
    assert_eq!(
        status["buffer_records"], 1,
        "only the POST is spooled: {status}"
    );
    assert_eq!(d.target_result("primary", "spooled").await, 1.0);
    assert!(backup.received().iter().all(|r| r.method == Method::POST));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn delete_and_patch_get_405_with_an_allow_header_and_reach_no_target() {
    let primary = sink().await;
    let backup = sink().await;
    let d = Daemon::start(&Conf::pair(&primary, &backup)).await;

    for method in [Method::DELETE, Method::PATCH] {
        let r = d
            .send(
                Request::builder()
                    .method(method.clone())
                    .uri("/thing")
                    .body(Full::new(Bytes::from("x")))
                    .unwrap(),
            )
            .await;
        assert_eq!(r.status, 405, "{method}");
        let allow = r.header("allow").expect("Allow header");
        let allowed: Vec<&str> = allow.split(',').map(str::trim).collect();
        for m in ["POST", "PUT", "GET", "HEAD"] {
            assert!(allowed.contains(&m), "Allow: {allow} lacks {m}");
        }
        assert!(!allowed.contains(&method.as_str()), "Allow: {allow}");
    }
    assert!(primary.received().is_empty());
    assert!(backup.received().is_empty());
}

/// forkd with one target, `primary`, and these `[server]` lines.
async fn primary_only(server: &[&str]) -> (Sink, Daemon) {
    let primary = sink().await;
    let conf = server
        .iter()
        .fold(Conf::new().target("primary", &primary.url()), |c, l| {
            c.server(l)
        });
    let d = Daemon::start(&conf).await;
    (primary, d)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_method_left_out_of_server_methods_gets_405() {
    let (primary, d) = primary_only(&["methods = [\"POST\"]"]).await;

    let r = d
        .send(
            Request::put("/p")
                .body(Full::new(Bytes::from("x")))
                .unwrap(),
        )
        .await;

    assert_eq!(r.status, 405);
    let allow = r.header("allow").unwrap();
    assert!(!allow.contains("PUT"), "Allow: {allow}");
    assert!(allow.contains("POST"), "Allow: {allow}");
    assert!(primary.received().is_empty());
    assert_eq!(d.post("/p", "x").await.status, 200);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_grpc_request_gets_415_and_reaches_no_target() {
    let primary = sink().await;
    let backup = sink().await;
    let d = Daemon::start(&Conf::pair(&primary, &backup)).await;

    // Media types are case-insensitive (RFC 9110 §8.3.1).
    for content_type in ["application/grpc+proto", " Application/gRPC"] {
        let r = d
            .send(
                Request::post("/opentelemetry.proto.collector.logs.v1.LogsService/Export")
                    .header("content-type", content_type)
                    .body(Full::new(Bytes::from_static(b"\0\0\0\0\0")))
                    .unwrap(),
            )
            .await;
        assert_eq!(r.status, 415, "{content_type:?}");
    }

    assert!(primary.received().is_empty());
    assert!(backup.received().is_empty());
}

// --------------------------------------------------------------------- body

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_over_max_body_size_by_content_length_gets_413_and_nothing_is_forwarded() {
    let primary = sink().await;
    let backup = sink().await;
    let d = Daemon::start(&Conf::pair(&primary, &backup).server("max_body_size = \"1KiB\"")).await;

    let r = d.post("/big", body_of("big", 1025)).await;
    assert_eq!(r.status, 413);
    assert!(primary.received().is_empty());
    assert!(backup.received().is_empty());

    // Exactly the limit is accepted.
    let r = d.post("/fits", body_of("fits", 1024)).await;
    assert_eq!(r.status, 200);
    assert_eq!(primary.received().len(), 1);
    assert_eq!(primary.received()[0].body.len(), 1024);
    assert_eq!(
        d.metric("forkd_requests_total", &[("status", "413")]).await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_over_the_limit_gets_413_and_nothing_is_forwarded() {
    let primary = sink().await;
    let backup = sink().await;
    let d = Daemon::start(&Conf::pair(&primary, &backup).server("max_body_size = \"1KiB\"")).await;

    let mut s = connect(d.running().addr).await;
    let chunk = "a".repeat(800);
    // Two 800-byte chunks and no terminating chunk: forkd must answer once
    // the second one takes the body over 1 KiB.
    let req = format!(
        "POST /chunked HTTP/1.1\r\nHost: forkd\r\nTransfer-Encoding: chunked\r\n\r\n\
         320\r\n{chunk}\r\n320\r\n{chunk}\r\n"
    );
    write_all(&mut s, req.as_bytes()).await;
    let mut buf = Vec::new();
    let head = read_head(&mut s, &mut buf).await;

    assert_eq!(head_status(&head), 413, "{head}");
    assert!(primary.received().is_empty());
    assert!(backup.received().is_empty());
    for t in ["primary", "backup"] {
        assert_eq!(d.target_status(t).await["buffer_records"], 0);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_disconnects_mid_body_causes_nothing_to_be_sent_or_spooled() {
    let primary = sink().await;
    let mut backup = sink().await;
    backup.stop().await; // a copy for a down target would be spooled
    let d = Daemon::start(&Conf::pair(&primary, &backup)).await;
    let connections = async || d.metric("forkd_client_connections", &[]).await;

    let mut s = connect(d.running().addr).await;
    write_all(
        &mut s,
        b"POST /cut HTTP/1.1\r\nHost: forkd\r\nContent-Length: 1000\r\n\r\n0123456789",
    )
    .await;
    wait_for("forkd to hold the connection", async || {
        connections().await == 1.0
    })
    .await;
    drop(s);
    wait_for("forkd to close the connection", async || {
        connections().await == 0.0
    })
    .await;

    assert!(
        primary.received().is_empty(),
        "a partial body was forwarded"
    );
    for t in ["primary", "backup"] {
        let st = d.target_status(t).await;
        assert_eq!(st["buffer_records"], 0, "{t}: {st}");
        assert_eq!(d.target_result(t, "spooled").await, 0.0);
        assert_eq!(d.target_result(t, "delivered").await, 0.0);
    }
    assert_eq!(d.metric("forkd_request_bytes_total", &[]).await, 0.0);
}

/// Two targets, the backup's live copy hanging: a request's fork is still
/// running after the primary answered, until `secondary_wait` (2 s) spools
/// the backup's copy, which the replay then delivers.
async fn fork_held_by_a_hanging_backup() -> (Sink, Sink, Daemon) {
    let (primary, backup, conf) = with_a_hanging_backup("2s").await;
    let d = Daemon::start(&conf).await;
    (primary, backup, d)
}

/// A primary, and a backup whose first live copy hangs (its timeout is
/// 60 s; it answers the requests after that one), configured as a pair
/// with this `secondary_wait`.
async fn with_a_hanging_backup(secondary_wait: &str) -> (Sink, Sink, Conf) {
    let primary = sink().await;
    let backup = sink_scripted([Behavior::Hang]).await;
    let conf = Conf::pair(&primary, &backup)
        .routing(&format!("secondary_wait = \"{secondary_wait}\""))
        .target_line("backup", "timeout = \"60s\"");
    (primary, backup, conf)
}

/// The fork ran to its end: delivered live to the primary, spooled for the
/// backup and delivered by the replay.
async fn assert_backup_got_it_by_replay(primary: &Sink, backup: &Sink, d: &Daemon, body: &str) {
    wait_for("the backup's copy to be spooled and replayed", async || {
        backup.delivered_count() == 1
    })
    .await;
    assert_eq!(backup.delivered()[0].body, body);
    assert_eq!(d.target_result("backup", "spooled").await, 1.0);
    assert_eq!(d.target_result("primary", "delivered").await, 1.0);
    assert_eq!(primary.received().len(), 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_that_leaves_after_its_whole_body_still_has_its_request_forked_to_every_target() {
    let (primary, backup, d) = fork_held_by_a_hanging_backup().await;

    let mut s = connect(d.running().addr).await;
    write_all(
        &mut s,
        b"POST /left HTTP/1.1\r\nHost: forkd\r\nContent-Length: 4\r\n\r\nbye!",
    )
    .await;
    wait_for("the primary to get the request", async || {
        primary.received().len() == 1
    })
    .await;
    drop(s);

    assert_backup_got_it_by_replay(&primary, &backup, &d, "bye!").await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_is_answered_by_forkd_before_the_body_is_sent() {
    let primary = sink().await;
    let backup = sink().await;
    let d = Daemon::start(&Conf::pair(&primary, &backup)).await;

    let mut s = connect(d.running().addr).await;
    write_all(
        &mut s,
        b"POST /upload HTTP/1.1\r\nHost: forkd\r\nContent-Length: 11\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    let mut buf = Vec::new();
    let interim = read_head(&mut s, &mut buf).await;
    assert!(
        interim.starts_with("HTTP/1.1 100 Continue"),
        "expected 100 Continue first, got {interim:?}"
    );
    write_all(&mut s, b"hello world").await;
    let fin = read_head(&mut s, &mut buf).await;

    assert_eq!(head_status(&fin), 200, "{fin}");
    for sink in [&primary, &backup] {
        let got = sink.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].body, "hello world");
        assert!(got[0].headers.get("expect").is_none(), "Expect forwarded");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn expect_100_continue_with_a_body_over_the_limit_gets_413_without_continue() {
    let (primary, d) = primary_only(&["max_body_size = \"1KiB\""]).await;

    let mut s = connect(d.running().addr).await;
    write_all(
        &mut s,
        b"POST /upload HTTP/1.1\r\nHost: forkd\r\nContent-Length: 5000\r\nExpect: 100-continue\r\n\r\n",
    )
    .await;
    let mut buf = Vec::new();
    let head = read_head(&mut s, &mut buf).await;

    assert_eq!(
        head_status(&head),
        413,
        "the client was invited to send: {head}"
    );
    assert!(primary.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_client_too_slow_to_send_its_body_gets_an_error_and_nothing_is_forwarded() {
    let (primary, d) = primary_only(&["request_timeout = \"300ms\""]).await;

    let mut s = connect(d.running().addr).await;
    write_all(
        &mut s,
        b"POST /slow HTTP/1.1\r\nHost: forkd\r\nContent-Length: 100\r\n\r\n0123456789",
    )
    .await;
    let mut buf = Vec::new();
    let head = read_head(&mut s, &mut buf).await;

    assert_eq!(head_status(&head), 408, "{head}");
    assert!(primary.received().is_empty());
    assert_eq!(d.target_status("primary").await["buffer_records"], 0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn request_timeout_counts_the_headers_too_not_only_the_body() {
    // SPEC: request_timeout bounds the whole request, headers and body. The
    // head trickles in over ~1.5 s and the body over ~1.5 s more: each half
    // fits in the 2 s request_timeout, the whole does not.
    let (primary, d) =
        primary_only(&["request_timeout = \"2s\"", "header_read_timeout = \"10s\""]).await;
    let pace = std::time::Duration::from_millis(150);

    let mut s = connect(d.running().addr).await;
    write_all(&mut s, b"POST /whole HTTP/1.1\r\nHost: forkd\r\n").await;
    for i in 0..10 {
        tokio::time::sleep(pace).await;
        write_all(&mut s, format!("X-Slow-{i}: {i}\r\n").as_bytes()).await;
    }
    write_all(&mut s, b"Content-Length: 10\r\n\r\n").await;
    for b in b"0123456789" {
        tokio::time::sleep(pace).await;
        // A write after forkd answered and closed may fail: that is the point.
        let _ = tokio::io::AsyncWriteExt::write_all(&mut s, &[*b]).await;
    }
    let mut buf = Vec::new();
    let head = read_head(&mut s, &mut buf).await;

    assert_eq!(head_status(&head), 408, "{head}");
    assert!(primary.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_chunked_body_with_trailers_is_forwarded_whole_without_the_trailers() {
    let (primary, d) = primary_only(&[]).await;

    let mut s = connect(d.running().addr).await;
    write_all(
        &mut s,
        b"POST /chunks HTTP/1.1\r\nHost: forkd\r\nTransfer-Encoding: chunked\r\n\
          Trailer: X-Checksum\r\n\r\n\
          5\r\nhello\r\n6\r\n world\r\n0\r\nX-Checksum: abc\r\n\r\n",
    )
    .await;
    let mut buf = Vec::new();
    let head = read_head(&mut s, &mut buf).await;

    assert_eq!(head_status(&head), 200, "{head}");
    let got = primary.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, "hello world");
    for name in ["x-checksum", "trailer", "transfer-encoding"] {
        assert!(
            got[0].headers.get(name).is_none(),
            "{name}: {:?}",
            got[0].headers
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_that_cannot_get_in_flight_budget_within_request_timeout_gets_503_with_retry_after()
{
    // The first request hangs at the target until its 3 s timeout.
    let primary = sink_scripted([Behavior::Hang]).await;
    let d = Daemon::start(
        &Conf::new()
            .target("primary", &primary.url())
            .target_line("primary", "timeout = \"3s\"")
            .server("max_body_size = \"64KiB\"")
            .server("max_inflight_bytes = \"64KiB\"")
            .server("request_timeout = \"300ms\""),
    )
    .await;

    // The first request holds the whole budget while its target hangs.
    let first = {
        let client = d.client.clone();
        let req = Request::post(d.url("/first"))
            .body(Full::new(body_of("first", 64 << 10)))
            .unwrap();
        tokio::spawn(async move { client.request(req).await })
    };
    wait_for("the first request to reach the target", async || {
        primary.received().len() == 1
    })
    .await;

    let r = d.post("/second", "small").await;

    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some(), "503 without Retry-After");
    assert_eq!(
        primary.received().len(),
        1,
        "the second request was forwarded"
    );
    assert!(
        !first.is_finished(),
        "the first request should still be in flight"
    );

    // Once the first request is answered its budget is given back.
    let first = first.await.unwrap().unwrap();
    assert_eq!(first.status(), 202, "the timed-out copy is spooled");
    wait_for("the budget to be released", async || {
        d.metric("forkd_inflight_bytes", &[]).await == 0.0
    })
    .await;
    let r = d.post("/third", body_of("third", 64 << 10)).await;
    assert!(r.status.is_success(), "{}: {}", r.status, r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_body_sent_in_one_byte_chunks_holds_its_size_of_the_budget_not_a_kibibyte_per_chunk() {
    // 4 KiB of body in 4,096 one-byte chunks against a 64 KiB budget: if
    // each chunk took a whole budget unit (1 KiB), the request would take
    // the whole budget after 64 chunks and wait for more until
    // `request_timeout` (503), stalling every other request meanwhile.
    let primary = sink().await;
    let d = Daemon::start(
        &Conf::new()
            .target("primary", &primary.url())
            .server("max_body_size = \"64KiB\"")
            .server("max_inflight_bytes = \"64KiB\"")
            .server("request_timeout = \"2s\""),
    )
    .await;
    let mut s = connect(d.running().addr).await;
    let mut req =
        b"POST /tiny-chunks HTTP/1.1\r\nHost: forkd\r\nTransfer-Encoding: chunked\r\n\r\n".to_vec();
    for _ in 0..4096 {
        req.extend_from_slice(b"1\r\nz\r\n");
    }
    req.extend_from_slice(b"0\r\n\r\n");
    write_all(&mut s, &req).await;
    let mut buf = Vec::new();
    let head = read_head(&mut s, &mut buf).await;

    assert_eq!(head_status(&head), 200, "{head}");
    let got = primary.received();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, "z".repeat(4096).as_bytes());
    // And the budget was given back whole: a body of the whole budget fits.
    wait_for("the budget to be released", async || {
        d.metric("forkd_inflight_bytes", &[]).await == 0.0
    })
    .await;
    let r = d.post("/whole", body_of("whole", 64 << 10)).await;
    assert_eq!(r.status, 200, "{}", r.text());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_refuses_a_max_body_size_larger_than_the_in_flight_budget_in_force() {
    // `max_inflight_bytes` takes effect at restart, `max_body_size` at once:
    // a body larger than the budget in force could never be held, and would
    // hold all of it while it waited, so every other request got 503.
    let primary = sink().await;
    let conf = Conf::new()
        .target("primary", &primary.url())
        .server("max_body_size = \"64KiB\"")
        .server("max_inflight_bytes = \"64KiB\"");
    let d = Daemon::start(&conf).await;

    let err = d
        .reload(
            &Conf::new()
                .target("primary", &primary.url())
                .server("max_body_size = \"1MiB\"")
                .server("max_inflight_bytes = \"1MiB\""),
        )
        .await
        .unwrap_err();
    assert!(
        err.contains("max_body_size") && err.contains("restart"),
        "{err}"
    );

    // The old limits still rule: a body over 64 KiB gets 413 at once.
    let r = d.post("/big", body_of("big", 128 << 10)).await;
    assert_eq!(r.status, 413, "{}", r.text());
    assert!(primary.received().is_empty());
    // A reload whose max_body_size fits the budget in force is accepted.
    d.reload(&conf.clone().server("request_timeout = \"20s\""))
        .await
        .unwrap();
}

// ---------------------------------------------------------------- admission

/// primary up; backup down with a 1 MiB spool under `when_full`; bodies of 600 KiB.
async fn full_backup(when_full: &str) -> (forkd::sink::Sink, forkd::sink::Sink, Daemon) {
    let primary = sink().await;
    let backup = stopped_sink().await;
    let d = Daemon::start(
        &small_spools(Conf::pair(&primary, &backup))
            .buffer("fsync = \"never\"")
            .target_buffer("backup", &format!("when_full = \"{when_full}\"")),
    )
    .await;
    (primary, backup, d)
}

/// Bodies up to 1 MiB, 4 MiB of them in flight, 1 MiB spools: a spool
/// holds one record of [`SIX_HUNDRED_KIB`], not two.
fn small_spools(conf: Conf) -> Conf {
    conf.server("max_body_size = \"1MiB\"")
        .server("max_inflight_bytes = \"4MiB\"")
        .buffer("max_size = \"1MiB\"")
}

const SIX_HUNDRED_KIB: usize = 600 << 10;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_under_reject_gets_503_and_nothing_is_sent_to_any_target() {
    let (primary, _backup, d) = full_backup("reject").await;

    let r = d.post("/one", body_of("one", SIX_HUNDRED_KIB)).await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(d.target_status("backup").await["buffer_records"], 1);

    let r = d.post("/two", body_of("two", SIX_HUNDRED_KIB)).await;

    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some(), "503 without Retry-After");
    assert_eq!(
        primary.received().len(),
        1,
        "a refused request was still sent to the primary"
    );
    assert_eq!(d.target_status("backup").await["buffer_records"], 1);
    assert_eq!(d.target_result("backup", "spooled").await, 1.0);
    assert_eq!(
        d.metric("forkd_requests_total", &[("status", "503")]).await,
        1.0
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_refused_by_a_full_spool_costs_no_other_spool_a_record() {
    // Both targets down, each spool holding one record of a 1 MiB bound.
    // The backup (drop_oldest, the default for a non-active target) is
    // admitted before the primary in name order; the primary (reject, the
    // default for the active target) refuses the next request, which must
    // not have evicted the backup's record first.
    let primary = stopped_sink().await;
    let backup = stopped_sink().await;
    let d = Daemon::start(&small_spools(Conf::pair(&primary, &backup)).buffer("fsync = \"never\""))
        .await;
    let r = d.post("/one", body_of("one", SIX_HUNDRED_KIB)).await;
    assert_eq!(r.status, 202, "{}", r.text());

    let r = d.post("/two", body_of("two", SIX_HUNDRED_KIB)).await;

    assert_eq!(r.status, 503, "{}", r.text());
    for target in ["primary", "backup"] {
        assert_eq!(
            d.target_status(target).await["buffer_records"],
            1,
            "{target}'s spool changed for a refused request"
        );
        assert_eq!(
            d.metric(
                "forkd_buffer_dropped_records_total",
                &[("target", target), ("reason", "full")]
            )
            .await,
            0.0,
            "{target} evicted a record for a refused request"
        );
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_under_drop_newest_answers_and_counts_the_copy_as_dropped() {
    let (primary, _backup, d) = full_backup("drop_newest").await;

    assert_eq!(
        d.post("/one", body_of("one", SIX_HUNDRED_KIB)).await.status,
        200
    );
    let r = d.post("/two", body_of("two", SIX_HUNDRED_KIB)).await;

    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(primary.received().len(), 2);
    assert_eq!(d.target_result("backup", "dropped").await, 1.0);
    assert_eq!(d.target_result("backup", "spooled").await, 1.0);
    assert_eq!(d.target_status("backup").await["buffer_records"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_full_spool_under_drop_oldest_evicts_and_counts_the_evictions() {
    let (primary, mut backup, d) = full_backup("drop_oldest").await;

    for tag in ["r0", "r1", "r2"] {
        let r = d.post("/x", body_of(tag, SIX_HUNDRED_KIB)).await;
        assert_eq!(r.status, 200, "{tag}: {}", r.text());
    }
    assert_eq!(primary.received().len(), 3);
    assert_eq!(
        d.metric(
            "forkd_buffer_dropped_records_total",
            &[("target", "backup"), ("reason", "full")]
        )
        .await,
        2.0
    );
    assert_eq!(d.target_result("backup", "dropped").await, 0.0);
    assert_eq!(d.target_status("backup").await["buffer_records"], 1);

    backup.restart().await.unwrap();
    d.wait_drained("backup").await;
    let bodies = delivered_bodies(&backup);
    assert_eq!(bodies.len(), 1, "evicted records were delivered");
    assert!(bodies[0].starts_with("r2"));
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_admitted_request_never_gets_503_for_lack_of_spool_space() {
    // The active target is up at admission, so both copies go live; its slow
    // 503 sends both to a spool that can hold only one of them.
    let primary = sink_with(Behavior::Delay(std::time::Duration::from_millis(1500), 503)).await;
    let d = Daemon::start(
        &small_spools(Conf::new().target("primary", &primary.url()))
            .buffer("when_full = \"reject\""),
    )
    .await;

    let send = |tag: &'static str| {
        let client = d.client.clone();
        let req = Request::post(d.url("/x"))
            .body(Full::new(body_of(tag, SIX_HUNDRED_KIB)))
            .unwrap();
        tokio::spawn(async move { client.request(req).await.unwrap().status() })
    };
    let (a, b) = (send("a"), send("b"));
    let (a, b) = (a.await.unwrap(), b.await.unwrap());

    assert_eq!(
        (a.as_u16(), b.as_u16()),
        (202, 202),
        "an admitted request got {a} / {b}"
    );
    assert_eq!(d.target_status("primary").await["buffer_records"], 2);
    assert_eq!(d.target_result("primary", "spooled").await, 2.0);
}

// ------------------------------------------------------------ headers and URL

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn hop_by_hop_headers_and_those_named_in_connection_are_not_forwarded() {
    let primary = sink().await;
    let backup = sink().await;
    let d = Daemon::start(&Conf::pair(&primary, &backup)).await;

    let mut s = connect(d.running().addr).await;
    write_all(
        &mut s,
        b"POST /hop HTTP/1.1\r\n\
          Host: forkd.example\r\n\
          Connection: keep-alive, X-Hop-Secret\r\n\
          Keep-Alive: timeout=5\r\n\
          TE: trailers\r\n\
          Proxy-Authorization: Basic cHJveHk6cHc=\r\n\
          Proxy-Connection: keep-alive\r\n\
          X-Hop-Secret: do-not-forward\r\n\
          X-End-To-End: keep-me\r\n\
          Content-Type: text/plain\r\n\
          Content-Length: 2\r\n\r\nhi",
    )
    .await;
    let mut buf = Vec::new();
    let head = read_head(&mut s, &mut buf).await;
    assert_eq!(head_status(&head), 200, "{head}");

    for sink in [&primary, &backup] {
        let got = sink.received();
        assert_eq!(got.len(), 1);
        let h = &got[0].headers;
        for name in [
            "keep-alive",
            "te",
            "proxy-authorization",
            "proxy-connection",
            "x-hop-secret",
            "upgrade",
            "trailer",
        ] {
            assert!(h.get(name).is_none(), "{name} was forwarded: {h:?}");
        }
        if let Some(c) = h.get("connection") {
            assert!(
                !c.to_str().unwrap().to_ascii_lowercase().contains("x-hop"),
                "the client's Connection was forwarded: {c:?}"
            );
        }
        assert_eq!(h["x-end-to-end"], "keep-me");
        assert_eq!(h["content-type"], "text/plain");
        assert_eq!(got[0].body, "hi");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_upgrade_header_is_not_forwarded() {
    let (primary, d) = primary_only(&[]).await;

    let mut s = connect(d.running().addr).await;
    write_all(
        &mut s,
        b"POST /up HTTP/1.1\r\nHost: forkd\r\nUpgrade: h2c-or-anything\r\n\
          Content-Length: 2\r\n\r\nup",
    )
    .await;
    let mut buf = Vec::new();
    let head = read_head(&mut s, &mut buf).await;
    assert_eq!(head_status(&head), 200, "{head}");

    let got = primary.received();
    assert_eq!(got.len(), 1);
    assert!(
        got[0].headers.get("upgrade").is_none(),
        "{:?}",
        got[0].headers
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn host_is_the_targets_and_x_forwarded_for_is_appended() {
    let primary = sink().await;
    let backup = sink().await;
    let d = Daemon::start(&Conf::pair(&primary, &backup)).await;

    let r = d
        .send(
            Request::post("/xff")
                .header("host", "ingest.client.example")
                .header("x-forwarded-for", "10.1.2.3")
                .body(Full::new(Bytes::from("x")))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 200);
    let plain = d.post("/plain", "y").await;
    assert_eq!(plain.status, 200);
    let two_hops = d
        .send(
            Request::post("/two-hops")
                .header("x-forwarded-for", "10.1.2.3, 10.4.5.6")
                .header("x-forwarded-for", "10.7.8.9")
                .body(Full::new(Bytes::from("z")))
                .unwrap(),
        )
        .await;
    assert_eq!(two_hops.status, 200);

    for sink in [&primary, &backup] {
        let got = sink.received();
        assert_eq!(got[0].headers["host"], sink.addr().to_string());
        assert_eq!(got[0].headers["x-forwarded-for"], "10.1.2.3, 127.0.0.1");
        assert_eq!(got[1].headers["host"], sink.addr().to_string());
        assert_eq!(got[1].headers["x-forwarded-for"], "127.0.0.1");
        let xff: Vec<&str> = got[2]
            .headers
            .get_all("x-forwarded-for")
            .iter()
            .map(|v| v.to_str().unwrap())
            .collect();
        assert_eq!(xff.join(", "), "10.1.2.3, 10.4.5.6, 10.7.8.9, 127.0.0.1");
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_authorization_reaches_no_target_live_spooled_or_replayed() {
    let primary = sink().await;
    let mut backup = stopped_sink().await;
    let d = Daemon::start(&Conf::pair(&primary, &backup)).await;

    let r = d
        .send(
            Request::post("/auth")
                .header("authorization", "Bearer client-secret-7f3a")
                .body(Full::new(Bytes::from("payload")))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 200);
    assert!(primary.received()[0].headers.get("authorization").is_none());
    assert_eq!(d.target_status("backup").await["buffer_records"], 1);
    let on_disk = all_file_bytes(&d.buffer_dir());
    assert!(
        contains_bytes(&on_disk, b"payload"),
        "the record is not on disk"
    );
    assert!(
        !contains_bytes(&on_disk, b"client-secret-7f3a"),
        "the client's Authorization was spooled"
    );

    backup.restart().await.unwrap();
    wait_for("the replay", async || backup.delivered_count() == 1).await;
    let replayed = &backup.delivered()[0];
    assert_eq!(replayed.body, "payload");
    assert!(replayed.headers.get("authorization").is_none());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_clients_x_request_id_is_kept_at_every_target_and_in_the_answer() {
    let primary = sink().await;
    let backup = sink().await;
    let d = Daemon::start(&Conf::pair(&primary, &backup)).await;

    let r = d
        .send(
            Request::post("/id")
                .header("x-request-id", "client-id-42")
                .body(Full::new(Bytes::from("x")))
                .unwrap(),
        )
        .await;

    assert_eq!(r.status, 200);
    assert_eq!(r.header("x-request-id").as_deref(), Some("client-id-42"));
    for sink in [&primary, &backup] {
        assert_eq!(sink.received()[0].headers["x-request-id"], "client-id-42");
    }

    // An id that is not a sane token is replaced by a generated one.
    let r = d
        .send(
            Request::post("/id")
                .header("x-request-id", "x".repeat(200))
                .body(Full::new(Bytes::from("y")))
                .unwrap(),
        )
        .await;
    let id = r.header("x-request-id").unwrap();
    assert_eq!(uuid::Uuid::parse_str(&id).unwrap().get_version_num(), 7);
    for sink in [&primary, &backup] {
        assert_eq!(sink.received()[1].headers["x-request-id"], id.as_str());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_generated_request_id_is_a_uuidv7_the_same_at_both_targets_and_across_retries() {
    // The primary answers 503 once (retried); the backup is down (replayed).
    let primary = sink_scripted([Behavior::Status(503)]).await;
    let mut backup = stopped_sink().await;
    let d = Daemon::start(&Conf::pair(&primary, &backup)).await;

    let r = d.post("/gen", "needs an id").await;
    assert_eq!(r.status, 202, "{}", r.text());
    let answered = r
        .header("x-request-id")
        .expect("X-Request-Id in the answer");
    let id = uuid::Uuid::parse_str(&answered).expect("a UUID");
    assert_eq!(id.get_version_num(), 7, "{answered} is not a UUIDv7");

    wait_for("the primary's retry", async || {
        primary.delivered_count() == 1
    })
    .await;
    backup.restart().await.unwrap();
    wait_for("the backup's replay", async || {
        backup.delivered_count() == 1
    })
    .await;

    let attempts = primary.received();
    assert_eq!(attempts.len(), 2, "one 503 and one retry");
    for a in attempts.iter().chain(backup.delivered().iter()) {
        assert_eq!(a.headers["x-request-id"], answered.as_str());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_target_url_path_prefixes_the_request_path_and_its_query_replaces_the_clients() {
    let primary = sink().await;
    let d = Daemon::start(&Conf::new().target(
        "primary",
        &format!("{}/ingest/?sig=target-sig&sv=2024", primary.url()),
    ))
    .await;

    let r = d.post("/v1/logs?sig=client-sig&tenant=a", "x").await;

    assert_eq!(r.status, 200);
    assert_eq!(
        primary.received()[0].path_and_query,
        "/ingest/v1/logs?tenant=a&sig=target-sig&sv=2024"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn target_headers_apply_at_every_send_and_a_reloaded_value_reaches_spooled_records() {
    let primary = sink().await;
    // The backup refuses for now and asks for a long pause.
    let backup = sink_with(Behavior::RetryAfter(503, 30)).await;
    let conf = |backup_token: &str| {
        Conf::new()
            .target("primary", &primary.url())
            .target("backup", &format!("{}/in?sig={backup_token}", backup.url()))
            .retry("max_backoff = \"60s\"")
            .target_line(
                "primary",
                "headers = { Authorization = \"Bearer primary-token\", X-Tenant = \"p\" }",
            )
            .target_line(
                "backup",
                &format!("headers = {{ Authorization = \"Bearer {backup_token}\" }}"),
            )
    };
    let d = Daemon::start(&conf("backup-old")).await;

    let r = d
        .send(
            Request::post("/h")
                .header("authorization", "Bearer from-the-client")
                .header("x-tenant", "client-value")
                .body(Full::new(Bytes::from("x")))
                .unwrap(),
        )
        .await;
    assert_eq!(r.status, 200);
    let live = &primary.received()[0];
    assert_eq!(live.headers["authorization"], "Bearer primary-token");
    assert_eq!(live.headers["x-tenant"], "p");
    assert_eq!(
        backup.received()[0].headers["authorization"],
        "Bearer backup-old"
    );
    assert_eq!(backup.received()[0].path_and_query, "/in/h?sig=backup-old");

    // The live copy was refused with Retry-After: 30: the worker now waits.
    wait_for("the worker's pause", async || {
        d.target_status("backup").await["next_attempt_in_seconds"]
            .as_u64()
            .is_some_and(|s| s >= 20)
    })
    .await;
    assert_eq!(d.target_status("backup").await["buffer_records"], 1);
    let on_disk = all_file_bytes(&d.buffer_dir().join("backup"));
    assert!(
        !contains_bytes(&on_disk, b"backup-old"),
        "a target header was spooled"
    );

    // The token is rotated and the backup recovers.
    backup.set_default(Behavior::Status(200));
    d.reload(&conf("backup-new")).await.unwrap();
    wait_for("the replay", async || backup.delivered_count() == 1).await;

    let replay = &backup.delivered()[0];
    assert_eq!(
        replay.headers["authorization"], "Bearer backup-new",
        "a spooled record was replayed with the old target header"
    );
    assert_eq!(replay.headers.get_all("authorization").iter().count(), 1);
    assert_eq!(
        replay.path_and_query, "/in/h?sig=backup-new",
        "a spooled record was replayed with the old URL query"
    );
}

// ------------------------------------------------------- outcomes and answer

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_active_targets_answer_is_relayed_when_it_delivered() {
    let primary = sink_with(Behavior::Status(201)).await;
    let backup = sink_with(Behavior::Status(204)).await;
    let d = Daemon::start(&Conf::pair(&primary, &backup)).await;

    let r = d.post("/x", "x").await;

    assert_eq!(r.status, 201);
    assert_eq!(r.text(), "ok\n");
    assert_eq!(d.target_result("primary", "delivered").await, 1.0);
    assert_eq!(d.target_result("backup", "delivered").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_answer_relays_the_targets_status_and_headers() {
    let primary = sink_scripted([Behavior::RetryAfter(409, 7)]).await;
    let d = Daemon::start(&Conf::new().target("primary", &primary.url())).await;

    let r = d.post("/conflict", "x").await;

    assert_eq!(r.status, 409);
    assert_eq!(r.header("retry-after").as_deref(), Some("7"));
    assert_eq!(r.text(), "ok\n");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_active_targets_copy_is_dropped_the_client_gets_503() {
    let primary = stopped_sink().await;
    let backup = sink().await;
    let d = Daemon::start(
        &small_spools(Conf::pair(&primary, &backup))
            .target_buffer("primary", "when_full = \"drop_newest\""),
    )
    .await;

    let r = d.post("/one", body_of("one", SIX_HUNDRED_KIB)).await;
    assert_eq!(r.status, 200, "the backup answers: {}", r.text());
    let r = d.post("/two", body_of("two", SIX_HUNDRED_KIB)).await;

    assert_eq!(r.status, 503, "{}", r.text());
    assert!(r.header("retry-after").is_some());
    assert_eq!(d.target_result("primary", "dropped").await, 1.0);
    assert_eq!(d.target_status("primary").await["buffer_records"], 1);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_non_retry_status_is_relayed_not_retried_and_kept_in_rejected() {
    let primary = sink_scripted([Behavior::Status(400)]).await;
    let backup = sink().await;
    let d = Daemon::start(&Conf::pair(&primary, &backup)).await;

    let r = d.post("/bad", "malformed").await;

    assert_eq!(r.status, 400);
    assert_eq!(d.target_result("primary", "rejected").await, 1.0);
    assert_eq!(d.target_result("primary", "spooled").await, 0.0);
    assert_eq!(d.target_result("backup", "delivered").await, 1.0);
    let primary_report = d.inspect("primary");
    assert_eq!(primary_report.rejected_records, 1);
    assert_eq!(primary_report.records, 0);

    // Not retried: a later request is the primary's second and last arrival.
    assert_eq!(d.post("/good", "fine").await.status, 200);
    let got = primary.received();
    assert_eq!(got.len(), 2, "the rejected request was retried");
    assert_eq!(got[1].body, "fine");
    assert_eq!(d.state("primary").await, "up");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_every_copy_is_spooled_the_client_gets_spooled_status() {
    let primary = stopped_sink().await;
    let backup = stopped_sink().await;
    let mut d = Daemon::start(&Conf::pair(&primary, &backup)).await;
    let r = d.post("/x", "x").await;
    assert_eq!(r.status, 202, "{}", r.text());
    d.shutdown().await;

    let d = Daemon::start(&Conf::pair(&primary, &backup).routing("spooled_status = 200")).await;
    let r = d.post("/x", "x").await;
    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(d.target_result("primary", "spooled").await, 1.0);
    assert_eq!(d.target_result("backup", "spooled").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn when_the_active_copy_is_spooled_a_delivered_backup_answers() {
    let primary = stopped_sink().await;
    let backup = sink_with(Behavior::Status(201)).await;
    let d = Daemon::start(&Conf::pair(&primary, &backup)).await;

    let r = d.post("/x", "x").await;

    assert_eq!(r.status, 201, "{}", r.text());
    assert_eq!(d.target_result("primary", "spooled").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_retry_status_is_spooled_and_retried_until_delivered() {
    let primary = sink_scripted([Behavior::Status(503), Behavior::Status(500)]).await;
    let d = Daemon::start(&Conf::new().target("primary", &primary.url())).await;

    let r = d.post("/x", "eventually").await;
    assert_eq!(r.status, 202);

    wait_for("delivery", async || primary.delivered_count() == 1).await;
    let statuses: Vec<Option<u16>> = primary.received().iter().map(|r| r.status).collect();
    assert_eq!(statuses, [Some(503), Some(500), Some(200)]);
    assert!(primary.received().iter().all(|r| r.body == "eventually"));
    d.wait_drained("primary").await;
    assert_eq!(d.target_result("primary", "spooled").await, 1.0);
    assert_eq!(d.target_result("primary", "delivered").await, 1.0);
    assert_eq!(d.target_result("primary", "rejected").await, 0.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_answer_body_over_1_mib_gives_502() {
    let primary = sink_scripted([
        Behavior::Body(200, (1 << 20) + 1),
        Behavior::Body(200, 1 << 20),
    ])
    .await;
    let d = Daemon::start(&Conf::new().target("primary", &primary.url())).await;

    let r = d.post("/big-answer", "x").await;
    assert_eq!(r.status, 502, "{}", r.status);

    let r = d.post("/max-answer", "x").await;
    assert_eq!(r.status, 200);
    assert_eq!(r.body.len(), 1 << 20);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_backup_slower_than_secondary_wait_is_spooled_and_delivered_later() {
    // The live copy hangs; the replay is answered.
    let (_primary, backup, conf) = with_a_hanging_backup("100ms").await;
    let d = Daemon::start(&conf).await;

    let r = d.post("/x", "slow backup").await;

    assert_eq!(r.status, 200, "{}", r.text());
    assert_eq!(d.target_result("backup", "spooled").await, 1.0);
    assert_eq!(d.target_result("primary", "delivered").await, 1.0);
    wait_for("the backup's replay", async || {
        backup.delivered_count() == 1
    })
    .await;
    assert_eq!(backup.delivered()[0].body, "slow backup");
    d.wait_drained("backup").await;
    assert_eq!(d.target_result("backup", "delivered").await, 1.0);
}

// ------------------------------------------------------------- h2c and auth

/// An HTTP/2 (prior knowledge) connection to forkd.
async fn h2c_sender(d: &Daemon) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let stream = connect(d.running().addr).await;
    let (sender, conn) =
        hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(stream))
            .await
            .unwrap();
    tokio::spawn(conn);
    sender
}

/// Posts `body` over HTTP/2 and, once the primary has it (the fork is
/// running), drops the answer's future: hyper sends RST_STREAM(CANCEL) and
/// the connection, kept open by the returned sender, stays up.
async fn post_h2_and_reset(
    d: &Daemon,
    primary: &Sink,
    path: &str,
    body: impl Into<Bytes>,
) -> hyper::client::conn::http2::SendRequest<Full<Bytes>> {
    let mut sender = h2c_sender(d).await;
    let before = primary.received().len();
    let answer = sender.send_request(
        Request::post(d.url(path))
            .body(Full::new(body.into()))
            .unwrap(),
    );
    let request = tokio::spawn(answer);
    wait_for("the primary to get the request", async || {
        primary.received().len() > before
    })
    .await;
    request.abort();
    sender
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_copies_of_a_reset_http2_request_keep_its_body_in_the_in_flight_budget() {
    // The backup holds the fork for 30 s after the primary answered; the
    // budget has room for one 48 KiB body, and a request waits 1 s for it.
    let (primary, _backup, conf) = with_a_hanging_backup("30s").await;
    let d = Daemon::start(
        &conf
            .server("max_inflight_bytes = \"64KiB\"")
            .server("max_body_size = \"64KiB\"")
            .server("request_timeout = \"1s\""),
    )
    .await;
    let _h2 = post_h2_and_reset(&d, &primary, "/first", vec![b'a'; 48 << 10]).await;

    // The first body is still held by its copies: no room for a second.
    let second = d.post("/second", vec![b'b'; 48 << 10]).await;

    assert_eq!(second.status, 503, "{}", second.text());
    assert_eq!(primary.received().len(), 1, "the second request was sent");
    assert_eq!(
        d.metric("forkd_inflight_bytes", &[]).await,
        f64::from(48u32 << 10)
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_client_that_resets_its_stream_after_the_body_still_has_its_request_forked_to_every_target()
 {
    let (primary, backup, d) = fork_held_by_a_hanging_backup().await;

    let sender = post_h2_and_reset(&d, &primary, "/reset", "reset!").await;

    assert_backup_got_it_by_replay(&primary, &backup, &d, "reset!").await;
    assert!(
        !sender.is_closed(),
        "the connection was closed, not the stream"
    );
}

/// A copy does not wait for the active copy to take its own steps: the
/// backup answers while the primary (the active target) still hangs, and
/// its copy is delivered and counted then, not when the primary ends.
/// (A copy woken by a request not sent, a TLS handshake or its own
/// timeout has the same need.)
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_secondary_copy_completes_while_the_active_copy_still_hangs() {
    let primary = sink_scripted([Behavior::Hang]).await;
    // Answers well after the copies were sent: nothing else is happening
    // on the request then.
    let backup = sink_scripted([Behavior::Delay(std::time::Duration::from_millis(300), 200)]).await;
    let d =
        Daemon::start(&Conf::pair(&primary, &backup).target_line("primary", "timeout = \"60s\""))
            .await;

    let answer = {
        let client = d.client.clone();
        let req = Request::post(d.url("/held"))
            .body(Full::new(Bytes::from("held")))
            .unwrap();
        tokio::spawn(async move { client.request(req).await })
    };

    wait_for(
        "the backup's copy to be delivered while the primary hangs",
        async || d.target_result("backup", "delivered").await == 1.0,
    )
    .await;
    assert_eq!(backup.delivered_count(), 1);
    assert_eq!(primary.received().len(), 1);
    assert!(
        !answer.is_finished(),
        "the answer waits for the active target"
    );
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_h2c_prior_knowledge_client_is_answered_and_its_request_forked() {
    let primary = sink().await;
    let backup = sink().await;
    let d = Daemon::start(&Conf::pair(&primary, &backup)).await;

    let mut sender = h2c_sender(&d).await;
    let resp = sender
        .send_request(
            Request::post(d.url("/v1/metrics"))
                .body(Full::new(Bytes::from("over h2c")))
                .unwrap(),
        )
        .await
        .unwrap();

    assert_eq!(resp.version(), Version::HTTP_2);
    assert_eq!(resp.status(), 200);
    let body = resp.into_body().collect().await.unwrap().to_bytes();
    assert_eq!(body, "ok\n");
    for sink in [&primary, &backup] {
        let got = sink.received();
        assert_eq!(got.len(), 1);
        assert_eq!(got[0].body, "over h2c");
        assert_eq!(got[0].path_and_query, "/v1/metrics");
        assert_eq!(got[0].headers["host"], sink.addr().to_string());
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn auth_tokens_require_a_valid_bearer_token_which_is_not_forwarded() {
    let primary = sink().await;
    let backup = sink().await;
    let d = Daemon::start(&Conf::pair(&primary, &backup).server("auth_tokens = [\"t1\", \"t2\"]"))
        .await;
    let post = async |auth: Option<&str>| {
        let mut b = Request::post("/secure");
        if let Some(a) = auth {
            b = b.header("authorization", a);
        }
        d.send(b.body(Full::new(Bytes::from("x"))).unwrap()).await
    };

    for bad in [
        None,
        Some("Bearer nope"),
        Some("Basic dDE="),
        Some("Bearer t1x"),
    ] {
        let r = post(bad).await;
        assert_eq!(r.status, 401, "{bad:?}");
    }
    assert!(primary.received().is_empty());
    assert!(backup.received().is_empty());

    assert_eq!(post(Some("Bearer t1")).await.status, 200);
    assert_eq!(post(Some("Bearer t2")).await.status, 200);
    for sink in [&primary, &backup] {
        let got = sink.received();
        assert_eq!(got.len(), 2);
        assert!(got.iter().all(|r| r.headers.get("authorization").is_none()));
    }
    let get = d
        .send(Request::get("/q").body(Full::default()).unwrap())
        .await;
    assert_eq!(get.status, 401, "a GET skipped the token check");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_request_whose_target_answers_after_header_read_timeout_is_answered_on_its_connection() {
    // header_read_timeout bounds the wait for a request's head, not the
    // time forkd takes to answer it: a slow target must not cost the
    // client its answer, nor its keep-alive connection.
    let primary = sink_with(Behavior::Delay(std::time::Duration::from_millis(1500), 200)).await;
    let d = Daemon::start(
        &Conf::new()
            .target("primary", &primary.url())
            .server("header_read_timeout = \"300ms\""),
    )
    .await;

    let mut s = connect(d.running().addr).await;
    for path in ["/slow-1", "/slow-2"] {
        let req = format!("POST {path} HTTP/1.1\r\nHost: forkd\r\nContent-Length: 2\r\n\r\nok");
        write_all(&mut s, req.as_bytes()).await;
        let mut buf = Vec::new();
        let head = read_head(&mut s, &mut buf).await;
        assert_eq!(head_status(&head), 200, "{path}: {head}");
    }
    assert_eq!(primary.delivered().len(), 2);
}

/// A raw HTTP/2 peer on a plain connection to forkd: it sends the preface
/// and `settings`, acknowledges forkd's SETTINGS and PINGs (so forkd's
/// keep-alive sees a live peer), and reports the DATA it receives.
struct H2Peer {
    s: tokio::net::TcpStream,
    buf: Vec<u8>,
}

/// What [`H2Peer::next`] saw.
#[derive(Debug, PartialEq)]
enum H2Seen {
    /// DATA on a stream: its length, and whether it ended the stream.
    Data(usize, bool),
    /// GOAWAY, or the connection closed.
    Closed,
    /// Nothing worth reporting (acknowledged, or another frame).
    Other,
}

impl H2Peer {
    async fn open(addr: std::net::SocketAddr, settings: &[u8]) -> H2Peer {
        let mut s = connect(addr).await;
        let mut hello = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".to_vec();
        hello.extend_from_slice(&frame_head(settings.len(), 4, 0, 0));
        hello.extend_from_slice(settings);
        write_all(&mut s, &hello).await;
        H2Peer { s, buf: Vec::new() }
    }

    async fn send(&mut self, bytes: &[u8]) -> bool {
        use tokio::io::AsyncWriteExt;
        self.s.write_all(bytes).await.is_ok()
    }

    /// The next frame, read whole; forkd's SETTINGS and PINGs are
    /// acknowledged on the way.
    async fn next(&mut self) -> H2Seen {
        use tokio::io::AsyncReadExt;
        loop {
            if self.buf.len() >= 9 {
                let b = &self.buf;
                let len = usize::from(b[0]) << 16 | usize::from(b[1]) << 8 | usize::from(b[2]);
                if b.len() >= 9 + len {
                    let (kind, flags) = (b[3], b[4]);
                    let frame: Vec<u8> = self.buf.drain(..9 + len).collect();
                    let unacked = flags & 1 == 0;
                    let seen = match kind {
                        // END_STREAM is DATA's flag 1.
                        0 => H2Seen::Data(len, flags & 1 == 1),
                        4 if unacked => {
                            let ok = self.send(&frame_head(0, 4, 1, 0)).await;
                            if ok { H2Seen::Other } else { H2Seen::Closed }
                        }
                        6 if unacked => {
                            let mut pong = frame_head(8, 6, 1, 0).to_vec();
                            pong.extend_from_slice(&frame[9..]);
                            if self.send(&pong).await {
                                H2Seen::Other
                            } else {
                                H2Seen::Closed
                            }
                        }
                        7 => H2Seen::Closed,
                        _ => H2Seen::Other,
                    };
                    return seen;
                }
            }
            let mut chunk = [0u8; 16384];
            match self.s.read(&mut chunk).await {
                Ok(0) | Err(_) => return H2Seen::Closed,
                Ok(n) => self.buf.extend_from_slice(&chunk[..n]),
            }
        }
    }
}

/// An HTTP/2 frame head: length, type, flags, stream.
fn frame_head(len: usize, kind: u8, flags: u8, stream: u32) -> [u8; 9] {
    let l = u32::try_from(len).unwrap().to_be_bytes();
    let st = stream.to_be_bytes();
    [l[1], l[2], l[3], kind, flags, st[0], st[1], st[2], st[3]]
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_connection_that_opens_no_stream_is_closed_however_often_it_pings() {
    // PING and SETTINGS frames make forkd write (their acknowledgements),
    // but they are not requests: a peer that only pings must not hold one
    // of `max_connections` for ever.
    let (primary, d) = primary_only(&["header_read_timeout = \"1s\""]).await;
    let mut peer = H2Peer::open(d.running().addr, &[]).await;
    let mut ping = frame_head(8, 6, 0, 0).to_vec();
    ping.extend_from_slice(&[1, 2, 3, 4, 5, 6, 7, 8]);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));

    let closed = tokio::time::timeout(DEADLINE, async {
        loop {
            tokio::select! {
                seen = peer.next() => if seen == H2Seen::Closed { return },
                _ = tick.tick() => if !peer.send(&ping).await { return },
            }
        }
    })
    .await;

    assert!(closed.is_ok(), "a connection that only pings was kept open");
    assert!(primary.received().is_empty());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_http2_answer_read_slowly_for_longer_than_header_read_timeout_is_sent_whole() {
    // A reader that grants 16 KiB of flow-control window every 50 ms takes
    // about 0.8 s for a 256 KiB answer, past the 300 ms idle limit: an
    // answer being sent is progress, PINGs alone are not.
    const SIZE: usize = 256 << 10;
    let primary = sink_with(Behavior::Body(200, SIZE)).await;
    let d = Daemon::start(
        &Conf::new()
            .target("primary", &primary.url())
            .server("header_read_timeout = \"300ms\""),
    )
    .await;
    // SETTINGS: INITIAL_WINDOW_SIZE (4) = 16 KiB.
    let mut peer = H2Peer::open(d.running().addr, &[0, 4, 0, 0, 0x40, 0]).await;
    // HEADERS on stream 1, END_STREAM | END_HEADERS: GET http /big forkd.
    let block = [&[0x82, 0x86, 0x44, 4][..], b"/big", &[0x41, 5], b"forkd"].concat();
    let mut get = frame_head(block.len(), 1, 5, 1).to_vec();
    get.extend_from_slice(&block);
    assert!(peer.send(&get).await);

    let (mut got, mut granted) = (0usize, 0usize);
    let mut tick = tokio::time::interval(std::time::Duration::from_millis(50));
    let outcome = tokio::time::timeout(DEADLINE, async {
        loop {
            tokio::select! {
                seen = peer.next() => match seen {
                    H2Seen::Data(len, end) => {
                        got += len;
                        if end {
                            return "ended";
                        }
                    }
                    H2Seen::Closed => return "closed",
                    H2Seen::Other => {}
                },
                _ = tick.tick() => {
                    // Grant what was read since the last grant, on the
                    // stream and on the connection.
                    let more = u32::try_from(got - granted).unwrap();
                    if more > 0 {
                        let mut w = Vec::new();
                        for stream in [1, 0] {
                            w.extend_from_slice(&frame_head(4, 8, 0, stream));
                            w.extend_from_slice(&more.to_be_bytes());
                        }
                        if !peer.send(&w).await {
                            return "closed";
                        }
                        granted = got;
                    }
                }
            }
        }
    })
    .await
    .unwrap_or("timed out");

    assert_eq!(outcome, "ended", "after {got} of {SIZE} bytes");
    assert_eq!(got, SIZE);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_keep_alive_connection_idle_longer_than_header_read_timeout_is_closed() {
    use tokio::io::AsyncReadExt;
    let (primary, d) = primary_only(&["header_read_timeout = \"300ms\""]).await;

    let mut s = connect(d.running().addr).await;
    write_all(
        &mut s,
        b"POST /one HTTP/1.1\r\nHost: forkd\r\nContent-Length: 2\r\n\r\nok",
    )
    .await;
    let mut buf = Vec::new();
    let head = read_head(&mut s, &mut buf).await;
    assert_eq!(head_status(&head), 200, "{head}");

    // Then nothing: forkd must close the idle connection (read returns 0)
    // instead of holding it open for ever.
    let mut rest = [0u8; 1024];
    let closed = tokio::time::timeout(std::time::Duration::from_secs(20), async {
        loop {
            match s.read(&mut rest).await {
                Ok(0) | Err(_) => return true,
                Ok(_) => continue,
            }
        }
    })
    .await
    .unwrap_or(false);
    assert!(closed, "the idle keep-alive connection was not closed");
    assert_eq!(primary.delivered().len(), 1);
}
