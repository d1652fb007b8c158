#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! Hostile clients against the release binary: garbage, slowloris, huge
//! headers, a thousand idle connections, bad bodies, request smuggling shapes
//! and an HTTP/2 preface. Each is answered or closed cleanly, nothing it sent
//! reaches a target, and a good client keeps being served meanwhile.

mod common;
mod harness;

use std::collections::BTreeSet;
use std::io::{Read, Write};
use std::net::{Shutdown, SocketAddr, TcpStream};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::time::{Duration, Instant};

use common::Conf;
use forkd::sink::{Sink, SinkBuilder};
use harness::{Forkd, Rng, Setup, eventually, runtime};

// ---------------------------------------------------------------- helpers

/// forkd with two healthy targets, `header_read_timeout = "1s"`,
/// `max_body_size = "64KiB"`, and `extra` server lines.
struct Fixture {
    d: Forkd,
    primary: Sink,
    backup: Sink,
    _rt: tokio::runtime::Runtime,
    _setup: Setup,
    good: AtomicU64,
    /// For tests whose hostile requests may be forwarded (decoded) on purpose.
    skip_forward_check: bool,
}

impl Fixture {
    fn start(extra: &[&str]) -> Fixture {
        let rt = runtime();
        let primary = rt.block_on(SinkBuilder::new().start()).unwrap();
        let backup = rt.block_on(SinkBuilder::new().start()).unwrap();
        let setup = Setup::new();
        let mut conf = Conf::pair(&primary, &backup)
            .server("max_body_size = \"64KiB\"")
            .server("request_timeout = \"5s\"");
        if !extra.iter().any(|l| l.starts_with("header_read_timeout")) {
            conf = conf.server("header_read_timeout = \"1s\"");
        }
        for l in extra {
            conf = conf.server(l);
        }
        let config = setup.write(&conf, &setup.spool_dir());
        let d = Forkd::start(&config);
        Fixture {
            d,
            primary,
            backup,
            _rt: rt,
            _setup: setup,
            good: AtomicU64::new(0),
            skip_forward_check: false,
        }
    }

    fn addr(&self) -> SocketAddr {
        self.d.addr
    }

    /// A good client's request: must be answered 200.
    fn good(&self, what: &str) {
        let n = self.good.fetch_add(1, Ordering::Relaxed);
        let id = format!("good-{n}");
        let body = format!("good-{n} while {what}");
        let r = harness::request(
            self.addr(),
            "POST",
            "/v1/good",
            &[("X-Request-Id", &id)],
            body.as_bytes(),
        )
        .unwrap_or_else(|e| panic!("good request while {what}: {e}"));
        assert_eq!(r.status, 200, "good request while {what}: {}", r.text());
    }

    /// Every good request reached both targets (at least once: a copy that
    /// outlives `secondary_wait` is spooled and replayed), and nothing else did.
    fn assert_only_good_forwarded(&self) {
        let good = self.good.load(Ordering::Relaxed) as usize;
        for (name, sink) in [("primary", &self.primary), ("backup", &self.backup)] {
            eventually(&format!("every good request at {name}"), || {
                (good_ids(sink).len() >= good).then_some(())
            });
            for r in sink.received() {
                assert!(
                    r.body.starts_with(b"good-"),
                    "{name} received a hostile request: {:?}",
                    String::from_utf8_lossy(&r.body[..r.body.len().min(200)])
                );
            }
        }
    }

    fn finish(mut self) {
        if !self.skip_forward_check {
            self.assert_only_good_forwarded();
        }
        assert!(self.d.is_running(), "forkd died:\n{}", self.d.stderr());
        assert_eq!(self.d.terminate().code(), Some(0), "{}", self.d.stderr());
        self.d.assert_no_panic();
    }
}

/// The distinct good requests a sink got a 2xx for.
fn good_ids(sink: &Sink) -> BTreeSet<Vec<u8>> {
    sink.delivered()
        .iter()
        .filter(|r| r.body.starts_with(b"good-"))
        .map(|r| r.body.to_vec())
        .collect()
}

/// What a hostile connection got back.
#[derive(Debug, PartialEq, Eq)]
enum Outcome {
    /// An HTTP/1.1 answer with this status (the connection may stay open).
    Status(u16),
    /// Closed (EOF or reset) without an answer.
    Closed,
}

/// Reads until a response head or the end of the connection; fails if
/// neither comes within the harness deadline (forkd would be hanging).
fn outcome(s: &mut TcpStream) -> Outcome {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    let mut buf = Vec::new();
    loop {
        if let Some(end) = buf.windows(4).position(|w| w == b"\r\n\r\n") {
            let head = String::from_utf8_lossy(&buf[..end]).into_owned();
            let status = head
                .split_whitespace()
                .nth(1)
                .and_then(|c| c.parse().ok())
                .unwrap_or_else(|| panic!("not an HTTP answer: {head:?}"));
            return Outcome::Status(status);
        }
        let mut chunk = [0u8; 4096];
        match s.read(&mut chunk) {
            Ok(0) => return Outcome::Closed,
            Ok(n) => buf.extend_from_slice(&chunk[..n]),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) =>
            {
                assert!(
                    Instant::now() < until,
                    "forkd neither answered nor closed; got {:?}",
                    String::from_utf8_lossy(&buf)
                );
            }
            Err(_) => return Outcome::Closed,
        }
    }
}

/// Sends `bytes` on a fresh connection (optionally half-closing it) and
/// returns what came back.
fn send_raw(addr: SocketAddr, bytes: &[u8], half_close: bool) -> Outcome {
    let mut s = TcpStream::connect(addr).unwrap();
    if s.write_all(bytes).is_err() {
        return Outcome::Closed;
    }
    if half_close {
        let _ = s.shutdown(Shutdown::Write);
    }
    outcome(&mut s)
}

fn assert_refused(what: &str, got: &Outcome) {
    match got {
        Outcome::Closed => {}
        Outcome::Status(s) => assert!(
            (400..500).contains(s),
            "{what}: answered {s}, want a 4xx or a close"
        ),
    }
}

/// Reads and discards until forkd closes the connection; false if it is
/// still open after 30 s.
fn closes(s: &mut TcpStream) -> bool {
    s.set_read_timeout(Some(Duration::from_millis(200)))
        .unwrap();
    let until = Instant::now() + Duration::from_secs(30);
    let mut sink = [0u8; 4096];
    while Instant::now() < until {
        match s.read(&mut sink) {
            Ok(0) => return true,
            Ok(_) => {}
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Sets the flag when dropped, also while a failed assertion unwinds, so
/// that threads looping on it end and a scope can be left.
struct StopOnDrop<'a>(&'a AtomicBool);

impl Drop for StopOnDrop<'_> {
    fn drop(&mut self) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// Writes `bytes` one byte every `gap`; returns true when forkd closed the
/// connection before the client got to the end.
fn trickle(addr: SocketAddr, bytes: &[u8], gap: Duration) -> bool {
    let mut s = TcpStream::connect(addr).unwrap();
    s.set_read_timeout(Some(gap)).unwrap();
    for b in bytes {
        if s.write_all(&[*b]).is_err() {
            return true;
        }
        // Waiting for forkd's answer between bytes is the trickle's pace.
        let mut one = [0u8; 1024];
        match s.read(&mut one) {
            Ok(0) => return true,
            // An answer (a 408, or HTTP/2 frames), then the close.
            Ok(_) => return closes(&mut s),
            Err(e)
                if matches!(
                    e.kind(),
                    std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut
                ) => {}
            Err(_) => return true,
        }
    }
    false
}

/// Runs good requests in a loop until `stop`; returns how many were served.
fn good_client_meanwhile<'a>(
    scope: &'a std::thread::Scope<'a, '_>,
    f: &'a Fixture,
    what: &'a str,
    stop: &'a AtomicBool,
) -> std::thread::ScopedJoinHandle<'a, u64> {
    scope.spawn(move || {
        let mut n = 0;
        let until = Instant::now() + Duration::from_secs(120);
        while !stop.load(Ordering::Relaxed) && n < 2_000 && Instant::now() < until {
            f.good(what);
            n += 1;
            // A client's pace, not a synchronisation.
            std::thread::sleep(Duration::from_millis(50));
        }
        n
    })
}

// ---------------------------------------------------------------- garbage

#[test]
fn garbage_bytes_are_answered_with_a_4xx_or_closed_and_good_clients_are_still_served() {
    let f = Fixture::start(&[]);
    let mut rng = Rng::from_env("garbage");
    let mut cases: Vec<(String, Vec<u8>, bool)> = vec![
        ("NUL bytes".into(), vec![0u8; 512], true),
        (
            "control bytes in the request line".into(),
            b"POST\x00\x01 /x HTTP/1.1\r\n\r\n".to_vec(),
            false,
        ),
        (
            "a request line of 100 KB without an end".into(),
            [b"POST /".as_slice(), &vec![b'a'; 100 << 10]].concat(),
            false,
        ),
        ("only line ends".into(), b"\r\n\r\n\r\n\r\n".to_vec(), true),
        ("HTTP/0.9".into(), b"GET /\r\n".to_vec(), true),
        (
            "an unknown version".into(),
            b"POST /x HTTP/7.3\r\nHost: a\r\n\r\n".to_vec(),
            false,
        ),
        (
            "a header without a colon".into(),
            b"POST /x HTTP/1.1\r\nHost a\r\n\r\n".to_vec(),
            false,
        ),
        (
            "a TLS ClientHello on the plain port".into(),
            b"\x16\x03\x01\x02\x00\x01\x00\x01\xfc\x03\x03garbage-random-bytes".to_vec(),
            true,
        ),
        (
            "an HTTP/2 preface followed by junk frames".into(),
            [b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n".as_slice(), &[0xff; 64]].concat(),
            false,
        ),
    ];
    for i in 0..16 {
        let len = rng.range(1, 8192) as usize;
        let bytes: Vec<u8> = (0..len).map(|_| rng.next_u64() as u8).collect();
        cases.push((format!("{len} random bytes (#{i})"), bytes, i % 2 == 0));
    }
    let started = Instant::now();
    std::thread::scope(|s| {
        for (what, bytes, half_close) in &cases {
            let f = &f;
            s.spawn(move || {
                let got = send_raw(f.addr(), bytes, *half_close);
                assert_refused(what, &got);
                f.good(what);
            });
        }
    });
    eprintln!(
        "garbage: {} cases answered or closed in {} ms",
        cases.len(),
        started.elapsed().as_millis()
    );
    f.finish();
}

// ---------------------------------------------------------------- slowloris

#[test]
fn slowloris_connections_are_closed_by_forkd_while_good_clients_are_served() {
    let f = Fixture::start(&[]);
    let header = {
        let mut h = b"POST /v1/slow HTTP/1.1\r\nHost: forkd\r\nX-Slow: ".to_vec();
        h.extend(std::iter::repeat_n(b'a', 40));
        h
    };
    let preface = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";
    let stop = AtomicBool::new(false);
    std::thread::scope(|s| {
        let _stop = StopOnDrop(&stop);
        let good = good_client_meanwhile(s, &f, "slowloris", &stop);
        let trickled = [
            ("a header sent a byte every 100 ms", &header[..], 100),
            ("a header sent a byte every 900 ms", &header[..], 900),
            (
                "an HTTP/2 preface sent a byte every 300 ms",
                &preface[..],
                300,
            ),
        ]
        .map(|(what, bytes, ms)| {
            let f = &f;
            (
                what,
                s.spawn(move || trickle(f.addr(), bytes, Duration::from_millis(ms))),
            )
        });
        let silent = s.spawn(|| {
            let mut c = TcpStream::connect(f.addr()).unwrap();
            closes(&mut c)
        });
        let h2_then_silent = s.spawn(|| {
            let mut c = TcpStream::connect(f.addr()).unwrap();
            c.write_all(preface).unwrap();
            closes(&mut c)
        });
        let mut results: Vec<(&str, bool)> = trickled
            .into_iter()
            .map(|(what, t)| (what, t.join().unwrap()))
            .collect();
        results.push(("a connection that sends nothing", silent.join().unwrap()));
        results.push((
            "an HTTP/2 preface and then nothing",
            h2_then_silent.join().unwrap(),
        ));
        stop.store(true, Ordering::Relaxed);
        let served = good.join().unwrap();
        for (what, closed) in &results {
            assert!(closed, "{what}: forkd never closed the connection");
        }
        assert!(served > 0);
        eprintln!(
            "slowloris: {} slow connections closed by forkd; {served} good requests served meanwhile",
            results.len()
        );
    });
    f.finish();
}

// ---------------------------------------------------------------- large headers

#[test]
fn a_hundred_kilobytes_of_headers_get_431_or_a_close_and_nothing_is_forwarded() {
    let f = Fixture::start(&[]);
    let mut many = b"POST /v1/big HTTP/1.1\r\nHost: forkd\r\nContent-Length: 2\r\n".to_vec();
    for i in 0..100 {
        many.extend(format!("X-Filler-{i}: {}\r\n", "v".repeat(1000)).bytes());
    }
    many.extend(b"\r\nhi");
    let mut one = b"POST /v1/big HTTP/1.1\r\nHost: forkd\r\nContent-Length: 2\r\nX-Huge: ".to_vec();
    one.extend(std::iter::repeat_n(b'v', 100 << 10));
    one.extend(b"\r\n\r\nhi");
    for (what, bytes) in [("100 headers of 1 KB", &many), ("one 100 KB header", &one)] {
        let got = send_raw(f.addr(), bytes, false);
        assert!(
            matches!(got, Outcome::Status(431) | Outcome::Closed),
            "{what}: {got:?}"
        );
        eprintln!("large headers: {what}: {got:?}");
        f.good(what);
    }
    f.finish();
}

// ---------------------------------------------------------------- idle connections

/// The soft limit on open files, raised to the hard limit when it is below
/// `want` (children inherit it).
fn ensure_nofile(want: u64) -> u64 {
    let soft = || -> u64 {
        std::fs::read_to_string("/proc/self/limits")
            .unwrap()
            .lines()
            .find(|l| l.starts_with("Max open files"))
            .and_then(|l| l.split_whitespace().nth(3).map(str::to_owned))
            .and_then(|v| v.parse().ok())
            .unwrap_or(u64::MAX)
    };
    // The soft limit up to the hard one, else (as root) both.
    for limits in [
        format!("--nofile={want}:"),
        format!("--nofile={want}:{want}"),
    ] {
        if soft() >= want {
            break;
        }
        let _ = std::process::Command::new("prlimit")
            .args(["--pid", &std::process::id().to_string(), &limits])
            .stderr(std::process::Stdio::null())
            .status();
    }
    soft()
}

#[test]
fn a_thousand_idle_connections_keep_forkd_small_and_good_clients_served() {
    const IDLE: usize = 1000;
    // Enough descriptors for this process's ends and forkd's (they inherit it).
    let limit = ensure_nofile(4 * IDLE as u64);
    let idle = IDLE.min(limit.saturating_sub(200) as usize / 2);
    if idle < IDLE {
        eprintln!("idle connections: RLIMIT_NOFILE is {limit}; opening {idle}");
    }
    // Idle connections stay open for the measurement.
    let f = Fixture::start(&["header_read_timeout = \"120s\""]);
    for i in 0..50 {
        f.good(&format!("warm-up {i}"));
    }
    let before = f.d.rss_kib();
    let mut conns = Vec::with_capacity(idle);
    for i in 0..idle {
        let mut s = TcpStream::connect(f.addr()).unwrap();
        match i % 3 {
            // Silent since connecting.
            0 => {}
            // Stalled in the middle of its headers.
            1 => s
                .write_all(b"POST /v1/idle HTTP/1.1\r\nHost: forkd\r\nX-Idle: ")
                .unwrap(),
            // Idle after a request on a keep-alive connection (a GET is
            // proxied to the active target, so nothing is forked).
            _ => {
                s.write_all(b"GET /v1/idle HTTP/1.1\r\nHost: forkd\r\n\r\n")
                    .unwrap();
            }
        }
        conns.push(s);
    }
    eventually("every idle connection accepted by forkd", || {
        let open =
            f.d.metrics()
                .get("forkd_client_connections", &[])
                .unwrap_or(0.0);
        (open >= idle as f64).then_some(())
    });
    for i in 0..20 {
        f.good(&format!("{idle} idle connections open ({i})"));
    }
    let with = f.d.rss_kib();
    let fds = f.d.open_fds();
    eprintln!(
        "idle connections: VmRSS {before} KiB before, {with} KiB with {idle} idle connections \
         ({:.1} KiB each); forkd has {fds} descriptors open",
        (with.saturating_sub(before)) as f64 / idle as f64
    );
    assert!(
        fds >= idle,
        "forkd holds the connections: {fds} descriptors"
    );
    assert!(
        with < 64 << 10,
        "VmRSS {with} KiB with {idle} idle connections, over 64 MiB"
    );
    drop(conns);
    eventually("the connections gone from forkd_client_connections", || {
        let open =
            f.d.metrics()
                .get("forkd_client_connections", &[])
                .unwrap_or(f64::MAX);
        (open < 10.0).then_some(())
    });
    f.good("after the idle connections closed");
    // The GETs reached the primary only and are not forks; count them out.
    let gets = f
        .primary
        .received()
        .iter()
        .filter(|r| r.method == http::Method::GET)
        .count();
    assert_eq!(gets, idle / 3);
    let Fixture {
        d,
        primary,
        backup,
        _rt,
        _setup,
        good,
        ..
    } = f;
    let good = good.load(Ordering::Relaxed) as usize;
    for sink in [&primary, &backup] {
        eventually("every good request at both targets", || {
            (good_ids(sink).len() >= good).then_some(())
        });
        let received = sink.received();
        assert!(
            received
                .iter()
                .filter(|r| r.method == http::Method::POST)
                .all(|r| r.body.starts_with(b"good-"))
        );
    }
    let mut d = d;
    assert_eq!(d.terminate().code(), Some(0), "{}", d.stderr());
    d.assert_no_panic();
}

// ---------------------------------------------------------------- bodies

#[test]
fn a_chunked_body_past_max_body_size_gets_413_and_nothing_is_forwarded() {
    let f = Fixture::start(&[]);
    let mut s = TcpStream::connect(f.addr()).unwrap();
    let mut reader = s.try_clone().unwrap();
    // Write on one thread, read on this one: forkd answers before the body
    // ends, and a reset from our late writes must not eat its answer.
    let writer = std::thread::spawn(move || {
        let _ = s.write_all(
            b"POST /v1/chunked HTTP/1.1\r\nHost: forkd\r\nTransfer-Encoding: chunked\r\n\r\n",
        );
        let chunk = [
            format!("{:x}\r\n", 8192).into_bytes(),
            vec![b'z'; 8192],
            b"\r\n".to_vec(),
        ]
        .concat();
        for _ in 0..16 {
            if s.write_all(&chunk).is_err() {
                return;
            }
        }
        let _ = s.write_all(b"0\r\n\r\n");
    });
    let got = outcome(&mut reader);
    let _ = writer.join();
    assert_eq!(got, Outcome::Status(413));
    f.good("after a chunked body over the limit");
    f.finish();
}

#[test]
fn a_bad_chunk_encoding_gets_400_or_a_close_and_nothing_is_forwarded() {
    let f = Fixture::start(&[]);
    let head = "POST /v1/chunked HTTP/1.1\r\nHost: forkd\r\nTransfer-Encoding: chunked\r\n\r\n";
    let cases: [(&str, &[u8]); 5] = [
        ("a size that is not hex", b"zz\r\nhello\r\n0\r\n\r\n"),
        (
            "a size that overflows",
            b"fffffffffffffffffffff\r\nhello\r\n0\r\n\r\n",
        ),
        ("a negative size", b"-5\r\nhello\r\n0\r\n\r\n"),
        ("data longer than its size", b"2\r\nhello\r\n0\r\n\r\n"),
        ("no line end after the data", b"5\r\nhelloXX0\r\n\r\n"),
    ];
    for (what, body) in cases {
        let got = send_raw(f.addr(), &[head.as_bytes(), body].concat(), false);
        assert!(
            matches!(got, Outcome::Status(400) | Outcome::Closed),
            "{what}: {got:?}"
        );
        f.good(what);
    }
    // A transfer coding forkd does not know.
    let got = send_raw(
        f.addr(),
        b"POST /v1/x HTTP/1.1\r\nHost: forkd\r\nTransfer-Encoding: gzip\r\n\r\nhello",
        false,
    );
    assert!(
        matches!(got, Outcome::Status(400 | 501) | Outcome::Closed),
        "gzip: {got:?}"
    );
    f.finish();
}

/// RFC 9112 §6.3: a request with both Content-Length and Transfer-Encoding
/// is read by Transfer-Encoding alone, and the connection is closed after the
/// answer. hyper does exactly that (and drops the Content-Length header
/// before forkd sees the request); forkd then forwards the decoded body with
/// a Content-Length of its own, so no target can read it differently and
/// nothing can be smuggled behind it.
#[test]
fn content_length_with_transfer_encoding_is_read_by_transfer_encoding_alone_and_nothing_is_smuggled()
 {
    let f = Fixture::start(&[]);
    let smuggled = b"POST /v1/smuggled HTTP/1.1\r\nHost: forkd\r\nContent-Length: 5\r\n\r\nhello";
    let cases: [(&str, Vec<u8>, Vec<u8>); 2] = [
        (
            "both, agreeing",
            b"POST /v1/x HTTP/1.1\r\nHost: forkd\r\nContent-Length: 5\r\nTransfer-Encoding: chunked\r\n\r\n5\r\nhello\r\n0\r\n\r\n".to_vec(),
            b"hello".to_vec(),
        ),
        (
            "a request smuggled in the chunked body",
            [
                format!(
                    "POST /v1/x HTTP/1.1\r\nHost: forkd\r\nContent-Length: 4\r\nTransfer-Encoding: chunked\r\n\r\n{:x}\r\n",
                    smuggled.len()
                )
                .as_bytes(),
                smuggled,
                b"\r\n0\r\n\r\n",
            ]
            .concat(),
            smuggled.to_vec(),
        ),
    ];
    for (what, bytes, decoded) in &cases {
        let mut s = TcpStream::connect(f.addr()).unwrap();
        s.write_all(bytes).unwrap();
        let got = outcome(&mut s);
        assert!(matches!(got, Outcome::Status(200 | 400)), "{what}: {got:?}");
        // Whatever follows on this connection is not served (§6.3: close).
        let _ = s
            .write_all(b"POST /v1/after HTTP/1.1\r\nHost: forkd\r\nContent-Length: 5\r\n\r\nafter");
        assert!(closes(&mut s), "{what}: the connection stayed open");
        if got == Outcome::Status(200) {
            for sink in [&f.primary, &f.backup] {
                // Forwarded: the body decoded by Transfer-Encoding, with its own Content-Length.
                let r = eventually(&format!("{what} at the target"), || {
                    sink.delivered()
                        .into_iter()
                        .find(|r| r.path_and_query == "/v1/x" && r.body[..] == decoded[..])
                });
                assert_eq!(
                    r.headers["content-length"].to_str().unwrap(),
                    decoded.len().to_string(),
                    "{what}"
                );
                assert!(!r.headers.contains_key("transfer-encoding"), "{what}");
            }
        }
        eprintln!("content-length with transfer-encoding: {what}: {got:?}, connection closed");
        f.good(what);
    }
    for sink in [&f.primary, &f.backup] {
        for r in sink.received() {
            assert!(
                r.path_and_query == "/v1/x" || r.path_and_query == "/v1/good",
                "a smuggled request reached a target: {}",
                r.path_and_query
            );
        }
    }
    let mut f = f;
    f.skip_forward_check = true;
    f.finish();
}

// ---------------------------------------------------------------- HTTP/2

#[test]
fn an_http2_preface_gets_an_http2_settings_frame_back() {
    let f = Fixture::start(&[]);
    let mut s = TcpStream::connect(f.addr()).unwrap();
    s.write_all(b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n").unwrap();
    // An empty SETTINGS frame: length 0, type 4, flags 0, stream 0.
    s.write_all(&[0, 0, 0, 4, 0, 0, 0, 0, 0]).unwrap();
    s.set_read_timeout(Some(harness::DEADLINE)).unwrap();
    let mut head = [0u8; 9];
    s.read_exact(&mut head).unwrap();
    let len = u32::from_be_bytes([0, head[0], head[1], head[2]]);
    assert_eq!(head[3], 4, "the first frame is SETTINGS: {head:?}");
    assert_eq!(head[4] & 1, 0, "not an ACK");
    assert_eq!(&head[5..9], &[0, 0, 0, 0], "on stream 0");
    assert_eq!(len % 6, 0, "a SETTINGS payload is 6-byte entries");
    f.good("after an HTTP/2 client");
    drop(s);
    f.finish();
}
