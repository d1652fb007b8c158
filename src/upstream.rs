//! One attempt to send a request to a target, and what it means.
//!
//! [`send`] builds the upstream request from a [`Record`] and the target's
//! config in force (URL, query, headers applied at every send), sends it on the
//! target's pooled client within the target's `timeout`, and classifies the
//! result as an [`Attempt`]: the single place that decides delivered, rejected
//! or transient (retry), in the spirit of pingora's error-carries-retry design.

mod pipe;

use std::net::IpAddr;
use std::sync::Arc;
use std::time::{Duration, Instant, SystemTime};

use bytes::Bytes;
use http::header::{self, Entry, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::Target;
use crate::proxy_headers;
use crate::spool::Record;

pub use pipe::Pipe;
use pipe::{PipeErrorKind, RawAnswer};

/// Times a request is sent again when its connection closed before it was
/// answered (see [`pipe`](mod@pipe)).
const NOT_SENT_RETRIES: usize = 2;

/// Largest answer body relayed to a client; larger answers give 502.
pub const MAX_ANSWER_BODY: usize = 1 << 20;
/// Header carrying the request id on every attempt.
pub static X_REQUEST_ID: HeaderName = HeaderName::from_static("x-request-id");
/// Header appended with the client's address.
pub static X_FORWARDED_FOR: HeaderName = HeaderName::from_static("x-forwarded-for");

/// The pooled HTTP(S) client of one target.
pub type HttpClient = Client<HttpsConnector<HttpConnector>, Full<Bytes>>;

/// Builds a target's client: keep-alive pool, connect timeout, no Nagle, TLS
/// for `https://` with the system's roots plus the target's `ca_file`.
pub fn client(target: &Target) -> Result<HttpClient, String> {
    let mut connector = HttpConnector::new();
    connector.set_connect_timeout(Some(target.connect_timeout));
    connector.set_nodelay(true);
    connector.set_keepalive(Some(Duration::from_secs(60)));
    connector.enforce_http(false);
    let tls = crate::tls::client_config(&target.ca_certs)?;
    let https = HttpsConnectorBuilder::new()
        .with_tls_config(tls)
        .https_or_http()
        .enable_http1()
        .wrap_connector(connector);
    Ok(Client::builder(TokioExecutor::new())
        .timer(TokioTimer::new())
        .pool_timer(TokioTimer::new())
        .pool_idle_timeout(Duration::from_secs(60))
        .pool_max_idle_per_host(256)
        .build(https))
}

/// The pipelining client of an `http://` target (`None` for `https://`,
/// which goes through the hyper client).
pub fn pipe(target: &Target) -> Option<Arc<Pipe>> {
    if target.base.scheme_str() != Some("http") {
        return None;
    }
    let authority = target.base.authority()?;
    let port = authority.port_u16().unwrap_or(80);
    Some(Arc::new(Pipe::new(
        authority.host(),
        port,
        target.connect_timeout,
    )))
}

/// What a target answered, as relayed to a client.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: AnswerHeaders,
    /// `None` when the body was larger than [`MAX_ANSWER_BODY`] (relayed as 502).
    pub body: Option<Bytes>,
}

/// An answer's end-to-end headers (no hop-by-hop headers, no Content-Length).
#[derive(Debug, Clone)]
pub enum AnswerHeaders {
    /// Already a map (answers through hyper's client).
    Map(HeaderMap),
    /// The head of a pipelined answer as received: made into a map only
    /// when the answer is relayed, so the copy whose answer is not relayed
    /// (in active-active, one of two) costs no map.
    Head(Bytes),
}

impl AnswerHeaders {
    /// The header map.
    pub fn into_map(self) -> HeaderMap {
        match self {
            AnswerHeaders::Map(map) => map,
            AnswerHeaders::Head(head) => pipe::head_headers(&head),
        }
    }
}

/// Label values of `forkd_target_attempt_failures_total{reason}`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailureReason {
    Connect,
    Timeout,
    Status,
    Io,
    Tls,
}

impl FailureReason {
    pub fn as_str(self) -> &'static str {
        match self {
            FailureReason::Connect => "connect",
            FailureReason::Timeout => "timeout",
            FailureReason::Status => "status",
            FailureReason::Io => "io",
            FailureReason::Tls => "tls",
        }
    }
}

/// The outcome of one attempt, carrying the retry decision.
#[derive(Debug)]
pub enum Attempt {
    /// 2xx.
    Delivered(Answer),
    /// A status that is neither 2xx nor in `retry_statuses`: never retried.
    Rejected(Answer),
    /// Worth retrying later: network failure, timeout, or a `retry_statuses` code.
    Transient {
        reason: FailureReason,
        /// From the target's `Retry-After`, when it sent one.
        retry_after: Option<Duration>,
        /// The target's answer, when it sent one.
        answer: Option<Answer>,
        detail: String,
    },
}

/// Joins the target URL and the request's path and query.
///
/// The request path is appended to the target's path; the target's query
/// parameters replace any of the same name in the request's query.
pub fn join_uri(
    target: &Target,
    path_and_query: &http::uri::PathAndQuery,
) -> Result<Uri, http::Error> {
    let base_path = target.base.path().trim_end_matches('/');
    let mut s = String::with_capacity(base_path.len() + path_and_query.as_str().len() + 64);
    s.push_str(base_path);
    s.push_str(path_and_query.path());
    let mut first = true;
    let mut push = |s: &mut String, kv: &str| {
        s.push(if first { '?' } else { '&' });
        first = false;
        s.push_str(kv);
    };
    if let Some(q) = path_and_query.query() {
        for kv in q.split('&').filter(|kv| !kv.is_empty()) {
            let key = kv.split_once('=').map_or(kv, |(k, _)| k);
            if !target.query.iter().any(|(tk, _)| tk == key) {
                push(&mut s, kv);
            }
        }
    }
    for (k, v) in &target.query {
        if v.is_empty() {
            push(&mut s, k);
        } else {
            push(&mut s, &format!("{k}={v}"));
        }
    }
    let mut builder = Uri::builder().path_and_query(s);
    if let Some(scheme) = target.base.scheme() {
        builder = builder.scheme(scheme.clone());
    }
    if let Some(authority) = target.base.authority() {
        builder = builder.authority(authority.clone());
    }
    builder.build()
}

/// The headers a client request keeps when it is forwarded or spooled:
/// hop-by-hop headers, `Host`, `Authorization`, `Content-Length`, `Expect` and
/// `X-Request-Id` are removed (forkd sets the last and the length itself), and
/// `X-Forwarded-For` gets the client's address appended.
pub fn end_to_end_headers(mut headers: HeaderMap, client: Option<IpAddr>) -> HeaderMap {
    // One pass over the (few) headers present instead of a lookup for each
    // of the ~15 names that may have to go.
    let mut doomed: [Option<HeaderName>; 16] = Default::default();
    let mut n = 0;
    let mut named_in_connection = false;
    for name in headers.keys() {
        if name == header::CONNECTION {
            named_in_connection = true;
        }
        if proxy_headers::is_hop_by_hop(name)
            || name == header::HOST
            || name == header::AUTHORIZATION
            || name == header::CONTENT_LENGTH
            || name == header::EXPECT
            || name == X_REQUEST_ID
        {
            if n == doomed.len() {
                break;
            }
            doomed[n] = Some(name.clone());
            n += 1;
        }
    }
    if named_in_connection || n == doomed.len() {
        proxy_headers::strip_hop_by_hop(&mut headers);
        for name in [
            header::HOST,
            header::AUTHORIZATION,
            header::CONTENT_LENGTH,
            header::EXPECT,
        ] {
            headers.remove(name);
        }
        headers.remove(&X_REQUEST_ID);
    } else {
        for name in doomed.iter_mut().take(n).filter_map(Option::take) {
            headers.remove(name);
        }
    }
    if let Some(ip) = client {
        let addr = IpText::of(ip);
        // One lookup of the name for reading the priors and replacing them.
        match headers.entry(&X_FORWARDED_FOR) {
            Entry::Vacant(slot) => {
                if let Ok(v) = HeaderValue::from_bytes(addr.as_bytes()) {
                    slot.insert(v);
                }
            }
            Entry::Occupied(mut slot) => {
                let priors = || slot.iter().filter_map(|p| p.to_str().ok());
                // Exactly sized, so the value's bytes need no second allocation.
                let len = priors().map(|p| p.len() + 2).sum::<usize>() + addr.as_bytes().len();
                let mut value = Vec::with_capacity(len);
                for p in priors() {
                    value.extend_from_slice(p.as_bytes());
                    value.extend_from_slice(b", ");
                }
                value.extend_from_slice(addr.as_bytes());
                if let Ok(v) = HeaderValue::from_maybe_shared(Bytes::from(value)) {
                    slot.insert(v);
                }
            }
        }
    }
    headers
}

/// Builds the upstream request for `record` under `target`'s config in force.
pub fn build_request(
    target: &Target,
    record: &Record,
) -> Result<Request<Full<Bytes>>, http::Error> {
    let uri = join_uri(target, &record.path_and_query)?;
    let mut req = Request::builder()
        .method(record.method.clone())
        .uri(uri)
        .body(Full::new(record.body.clone()))?;
    let headers = req.headers_mut();
    headers.reserve(record.headers.len() + target.headers.len() + 2);
    for (name, value) in &record.headers {
        headers.append(name, value.clone());
    }
    if let Some(authority) = target.base.authority()
        && let Ok(host) = HeaderValue::from_str(authority.as_str())
    {
        headers.insert(header::HOST, host);
    }
    if let Ok(id) = HeaderValue::from_str(&record.request_id) {
        headers.insert(&X_REQUEST_ID, id);
    }
    for (name, value) in &target.headers {
        headers.insert(name, value.clone());
    }
    Ok(req)
}

/// The request line and headers of `record` for `target`, as
/// [`build_request`] makes them, encoded for HTTP/1.1.
pub fn request_head(target: &Target, record: &Record) -> Result<Bytes, http::Error> {
    let base_path = target.base.path().trim_end_matches('/');
    // The request's path and query are kept verbatim when join_uri would
    // not change them (no target query, no empty query parameters).
    let verbatim = target.query.is_empty()
        && record.path_and_query.query().is_none_or(|q| {
            !q.is_empty() && !q.starts_with('&') && !q.ends_with('&') && !q.contains("&&")
        });
    let joined;
    let path: &str = if verbatim {
        ""
    } else {
        joined = join_uri(target, &record.path_and_query)?;
        joined.path_and_query().map_or("/", |pq| pq.as_str())
    };
    let authority = target.base.authority().map_or("", |a| a.as_str());
    let id = record.request_id.as_bytes();
    // Without an early exit the check is vectorised: 440 instructions per
    // request fewer than `all` over a 36-byte id (callgrind).
    let id_ok = !id.is_empty()
        && id.iter().fold(true, |ok, &c| {
            ok & (c == b'\t' || (0x20..0x7f).contains(&c))
        });
    let mut digits = itoa_buf(record.body.len() as u64);
    let head = Head {
        method: record.method.as_str().as_bytes(),
        path: if verbatim {
            [
                base_path.as_bytes(),
                record.path_and_query.as_str().as_bytes(),
            ]
        } else {
            [path.as_bytes(), b""]
        },
        authority: authority.as_bytes(),
        headers: &record.headers,
        request_id: id_ok.then_some(id),
        target_headers: &target.headers,
        content_length: digits.as_bytes_mut(),
    };
    // Sized exactly first: a `Vec` whose length is its capacity becomes
    // `Bytes` without a second allocation.
    let mut len = 0;
    head.emit(&mut |piece| len += piece.len());
    let mut b = Vec::with_capacity(len);
    head.emit(&mut |piece| b.extend_from_slice(piece));
    Ok(Bytes::from(b))
}

/// The pieces of an upstream request head.
struct Head<'a> {
    method: &'a [u8],
    /// The target's base path and the request's path and query, or the
    /// joined path and query.
    path: [&'a [u8]; 2],
    authority: &'a [u8],
    /// The record's end-to-end headers (some are replaced, see `emit`).
    headers: &'a HeaderMap,
    request_id: Option<&'a [u8]>,
    target_headers: &'a [(HeaderName, HeaderValue)],
    content_length: &'a [u8],
}

impl Head<'_> {
    /// Hands every piece of the head to `out`, in order. The record's
    /// `Host`, `X-Request-Id` and framing headers, and those the target
    /// sets, are replaced.
    fn emit(&self, out: &mut impl FnMut(&[u8])) {
        fn header(out: &mut impl FnMut(&[u8]), name: &[u8], value: &[u8]) {
            for piece in [name, b": ", value, b"\r\n"] {
                out(piece);
            }
        }
        for piece in [self.method, b" ", self.path[0], self.path[1]] {
            out(piece);
        }
        out(b" HTTP/1.1\r\nhost: ");
        out(self.authority);
        out(b"\r\n");
        for (name, value) in self.headers {
            let replaced = proxy_headers::set_by_forkd(name)
                || self.target_headers.iter().any(|(n, _)| n == name);
            if !replaced {
                header(out, name.as_str().as_bytes(), value.as_bytes());
            }
        }
        if let Some(id) = self.request_id {
            header(out, b"x-request-id", id);
        }
        for (name, value) in self.target_headers.iter() {
            header(out, name.as_str().as_bytes(), value.as_bytes());
        }
        out(b"content-length: ");
        out(self.content_length);
        out(b"\r\n\r\n");
    }
}

/// Decimal digits of `n` without an allocation.
struct Digits {
    buf: [u8; 20],
    start: usize,
}

impl Digits {
    fn as_bytes_mut(&mut self) -> &[u8] {
        &self.buf[self.start..]
    }
}

fn itoa_buf(mut n: u64) -> Digits {
    let mut d = Digits {
        buf: [0; 20],
        start: 20,
    };
    loop {
        d.start -= 1;
        d.buf[d.start] = b'0' + (n % 10) as u8;
        n /= 10;
        if n == 0 {
            return d;
        }
    }
}

/// Appends `ip` as text; IPv4 (the common case) without the formatting
/// machinery, which showed in profiles of the request path.
/// An IP address's usual text, on the stack (no allocation, no `fmt` for IPv4).
struct IpText {
    buf: [u8; 48],
    len: usize,
}

impl IpText {
    fn of(ip: std::net::IpAddr) -> IpText {
        let mut t = IpText {
            buf: [0; 48],
            len: 0,
        };
        match ip {
            std::net::IpAddr::V4(v4) => {
                for (i, octet) in v4.octets().into_iter().enumerate() {
                    if i > 0 {
                        t.push(b".");
                    }
                    let mut digits = itoa_buf(u64::from(octet));
                    t.push(digits.as_bytes_mut());
                }
            }
            std::net::IpAddr::V6(v6) => {
                use std::fmt::Write;
                let _ = write!(t, "{v6}");
            }
        }
        t
    }

    fn push(&mut self, bytes: &[u8]) {
        // 45 bytes is the longest IPv6 text: never truncated in practice.
        let n = bytes.len().min(self.buf.len() - self.len);
        self.buf[self.len..self.len + n].copy_from_slice(&bytes[..n]);
        self.len += n;
    }

    fn as_bytes(&self) -> &[u8] {
        &self.buf[..self.len]
    }
}

impl std::fmt::Write for IpText {
    fn write_str(&mut self, s: &str) -> std::fmt::Result {
        self.push(s.as_bytes());
        Ok(())
    }
}

fn cannot_build(e: &http::Error) -> Attempt {
    // The record's path or headers cannot form a request for this target:
    // retrying cannot help.
    Attempt::Rejected(Answer {
        status: StatusCode::BAD_REQUEST,
        headers: AnswerHeaders::Map(HeaderMap::new()),
        body: Some(Bytes::from(format!(
            "forkd: cannot build the upstream request: {e}\n"
        ))),
    })
}

/// Sends `record` to `target` once, within `deadline` (normally the target's
/// `timeout`), on the hyper client (see [`send_pipelined`] for `http://`).
pub async fn send(
    client: &HttpClient,
    target: &Target,
    record: &Record,
    deadline: Duration,
) -> Attempt {
    let req = match build_request(target, record) {
        Ok(r) => r,
        Err(e) => return cannot_build(&e),
    };
    match tokio::time::timeout(deadline, exchange(client, req)).await {
        Err(_) => Attempt::Transient {
            reason: FailureReason::Timeout,
            retry_after: None,
            answer: None,
            detail: format!(
                "no complete answer within {}",
                humantime::format_duration(deadline)
            ),
        },
        Ok(Err((reason, detail))) => Attempt::Transient {
            reason,
            retry_after: None,
            answer: None,
            detail,
        },
        Ok(Ok(answer)) => classify(target, answer),
    }
}

/// [`send`] on the pipelining client of an `http://` target.
pub async fn send_pipelined(
    pipe: &Pipe,
    target: &Target,
    record: &Record,
    started: Instant,
    deadline: Duration,
) -> Attempt {
    // A deadline too large for the clock: a day is forever enough.
    let until = started
        .checked_add(deadline)
        .or_else(|| started.checked_add(Duration::from_secs(86_400)))
        .unwrap_or(started);
    let mut tries = 0;
    loop {
        // Encoded for each try (a retry is rare): handing the pipe the only
        // reference, rather than a clone, saves an allocation per send.
        let head = match request_head(target, record) {
            Ok(h) => h,
            Err(e) => return cannot_build(&e),
        };
        let result = pipe.send(head, record.body.clone(), started, until).await;
        let (reason, detail) = match result {
            Ok(RawAnswer { status, head, body }) => {
                return classify(
                    target,
                    Answer {
                        status,
                        headers: AnswerHeaders::Head(head),
                        body,
                    },
                );
            }
            Err(e) => match e.kind {
                PipeErrorKind::NotSent if tries < NOT_SENT_RETRIES && Instant::now() < until => {
                    tries += 1;
                    continue;
                }
                PipeErrorKind::Connect => (FailureReason::Connect, e.detail),
                PipeErrorKind::Timeout => (
                    FailureReason::Timeout,
                    format!(
                        "no complete answer within {}",
                        humantime::format_duration(deadline)
                    ),
                ),
                PipeErrorKind::Io | PipeErrorKind::NotSent | PipeErrorKind::Abandoned => {
                    (FailureReason::Io, e.detail)
                }
            },
        };
        return Attempt::Transient {
            reason,
            retry_after: None,
            answer: None,
            detail,
        };
    }
}

/// Sends a GET or HEAD through to the target (not forked, not spooled).
pub async fn pass_through(
    client: &HttpClient,
    target: &Target,
    method: Method,
    path_and_query: &http::uri::PathAndQuery,
    headers: HeaderMap,
    request_id: &str,
) -> Result<Answer, String> {
    let record = Record {
        accepted_at: SystemTime::now(),
        request_id: request_id.to_owned(),
        method,
        path_and_query: path_and_query.clone(),
        headers,
        body: Bytes::new(),
    };
    let req = build_request(target, &record).map_err(|e| e.to_string())?;
    match tokio::time::timeout(target.timeout, exchange(client, req)).await {
        Err(_) => Err("timed out".into()),
        Ok(Err((_, detail))) => Err(detail),
        Ok(Ok(answer)) => Ok(answer),
    }
}

fn classify(target: &Target, answer: Answer) -> Attempt {
    if answer.status.is_success() {
        Attempt::Delivered(answer)
    } else if target.retry_statuses.contains(&answer.status.as_u16()) {
        Attempt::Transient {
            reason: FailureReason::Status,
            retry_after: retry_after(&answer.headers.clone().into_map(), SystemTime::now()),
            detail: format!("answered {}", answer.status),
            answer: Some(answer),
        }
    } else {
        Attempt::Rejected(answer)
    }
}

async fn exchange(
    client: &HttpClient,
    req: Request<Full<Bytes>>,
) -> Result<Answer, (FailureReason, String)> {
    let resp: Response<hyper::body::Incoming> = client.request(req).await.map_err(|e| {
        let reason = if crate::tls::is_tls_error(&e) {
            FailureReason::Tls
        } else if e.is_connect() {
            FailureReason::Connect
        } else {
            FailureReason::Io
        };
        (reason, error_chain(&e))
    })?;
    let (parts, body) = resp.into_parts();
    let body = match Limited::new(body, MAX_ANSWER_BODY).collect().await {
        Ok(collected) => Some(collected.to_bytes()),
        Err(e)
            if e.downcast_ref::<http_body_util::LengthLimitError>()
                .is_some() =>
        {
            None
        }
        Err(e) => return Err((FailureReason::Io, format!("reading the answer: {e}"))),
    };
    let mut headers = parts.headers;
    proxy_headers::strip_hop_by_hop(&mut headers);
    headers.remove(header::CONTENT_LENGTH);
    Ok(Answer {
        status: parts.status,
        headers: AnswerHeaders::Map(headers),
        body,
    })
}

/// The error and its causes on one line.
pub fn error_chain(e: &(dyn std::error::Error + 'static)) -> String {
    let mut s = e.to_string();
    let mut cur = e.source();
    while let Some(c) = cur {
        s.push_str(": ");
        s.push_str(&c.to_string());
        cur = c.source();
    }
    s
}

/// Parses `Retry-After`: delay-seconds or an HTTP-date.
pub fn retry_after(headers: &HeaderMap, now: SystemTime) -> Option<Duration> {
    let v = headers.get(header::RETRY_AFTER)?.to_str().ok()?.trim();
    if let Ok(secs) = v.parse::<u64>() {
        return Some(Duration::from_secs(secs));
    }
    let when = httpdate::parse_http_date(v).ok()?;
    Some(when.duration_since(now).unwrap_or(Duration::ZERO))
}

#[cfg(test)]
mod tests {
    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[test]
    fn client_addresses_are_written_as_their_usual_text() -> TestResult {
        for ip in [
            "10.0.255.1",
            "0.0.0.0",
            "255.255.255.255",
            "::1",
            "2001:db8::8a2e:370:7334",
        ] {
            assert_eq!(super::IpText::of(ip.parse()?).as_bytes(), ip.as_bytes());
        }
        Ok(())
    }

    use super::*;
    use crate::config::parse_target_url;

    fn target(url: &str) -> Result<Target, Box<dyn std::error::Error>> {
        let (base, query) = parse_target_url(url)?;
        Ok(Target {
            name: "t".into(),
            base,
            query,
            timeout: Duration::from_secs(1),
            connect_timeout: Duration::from_secs(1),
            headers: vec![],
            retry_statuses: vec![503],
            ca_file: None,
            ca_certs: Vec::new(),
            spool: Default::default(),
            when_full: None,
            drain_concurrency: 1,
        })
    }

    #[test]
    fn the_request_path_is_appended_and_target_query_parameters_replace_the_clients() -> TestResult
    {
        let t = target("http://h:1/ingest/?sig=SECRET&sv=2")?;
        let pq = "/v1/logs?sig=client&x=1".parse()?;
        assert_eq!(
            join_uri(&t, &pq)?.to_string(),
            "http://h:1/ingest/v1/logs?x=1&sig=SECRET&sv=2"
        );
        let t = target("http://h:1")?;
        assert_eq!(
            join_uri(&t, &"/a?b".parse()?)?.to_string(),
            "http://h:1/a?b"
        );
        Ok(())
    }

    #[test]
    fn retry_after_takes_seconds_and_http_dates() -> TestResult {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        h.insert(header::RETRY_AFTER, HeaderValue::from_str(&later)?);
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(30)));
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h, now), None);
        Ok(())
    }

    #[test]
    fn x_forwarded_for_is_appended_and_credentials_and_hop_by_hop_headers_are_dropped() -> TestResult
    {
        let mut h = HeaderMap::new();
        h.insert(
            header::AUTHORIZATION,
            HeaderValue::from_static("Bearer client"),
        );
        h.insert(header::CONNECTION, HeaderValue::from_static("close"));
        h.insert(header::HOST, HeaderValue::from_static("forkd"));
        h.insert(&X_FORWARDED_FOR, HeaderValue::from_static("10.0.0.1"));
        h.insert(
            header::CONTENT_TYPE,
            HeaderValue::from_static("application/json"),
        );
        let out = end_to_end_headers(h, Some("127.0.0.1".parse()?));
        assert_eq!(
            out.get(&X_FORWARDED_FOR).ok_or("no X-Forwarded-For")?,
            "10.0.0.1, 127.0.0.1"
        );
        assert!(out.get(header::AUTHORIZATION).is_none());
        assert!(out.get(header::CONNECTION).is_none());
        assert!(out.get(header::HOST).is_none());
        assert_eq!(
            out.get(header::CONTENT_TYPE).ok_or("no Content-Type")?,
            "application/json"
        );
        Ok(())
    }
}
