//! One attempt to send a request to a target, and what it means.
//!
//! [`send`] builds the upstream request from a [`Record`] and the target's
//! config in force (URL, query, headers applied at every send), sends it on the
//! target's pooled client within the target's `timeout`, and classifies the
//! result as an [`Attempt`]: the single place that decides delivered, rejected
//! or transient (retry), in the spirit of pingora's error-carries-retry design.

use std::net::IpAddr;
use std::time::{Duration, SystemTime};

use bytes::Bytes;
use http::header::{self, HeaderMap, HeaderName, HeaderValue};
use http::{Method, Request, Response, StatusCode, Uri};
use http_body_util::{BodyExt, Full, Limited};
use hyper_rustls::{HttpsConnector, HttpsConnectorBuilder};
use hyper_util::client::legacy::Client;
use hyper_util::client::legacy::connect::HttpConnector;
use hyper_util::rt::{TokioExecutor, TokioTimer};

use crate::config::Target;
use crate::proxy_headers;
use crate::spool::Record;

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

/// What a target answered, as relayed to a client.
#[derive(Debug, Clone)]
pub struct Answer {
    pub status: StatusCode,
    pub headers: HeaderMap,
    /// `None` when the body was larger than [`MAX_ANSWER_BODY`] (relayed as 502).
    pub body: Option<Bytes>,
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
    if let Some(ip) = client {
        let prior: Vec<String> = headers
            .get_all(&X_FORWARDED_FOR)
            .iter()
            .filter_map(|v| v.to_str().ok().map(str::to_owned))
            .collect();
        let mut value = prior.join(", ");
        if !value.is_empty() {
            value.push_str(", ");
        }
        value.push_str(&ip.to_string());
        if let Ok(v) = HeaderValue::from_str(&value) {
            headers.insert(&X_FORWARDED_FOR, v);
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

/// Sends `record` to `target` once, within `deadline` (normally the target's `timeout`).
pub async fn send(
    client: &HttpClient,
    target: &Target,
    record: &Record,
    deadline: Duration,
) -> Attempt {
    let req = match build_request(target, record) {
        Ok(r) => r,
        Err(e) => {
            // The record's path or headers cannot form a request for this
            // target: retrying cannot help.
            return Attempt::Rejected(Answer {
                status: StatusCode::BAD_REQUEST,
                headers: HeaderMap::new(),
                body: Some(Bytes::from(format!(
                    "forkd: cannot build the upstream request: {e}\n"
                ))),
            });
        }
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
            retry_after: retry_after(&answer.headers, SystemTime::now()),
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
        headers,
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
    use super::*;
    use crate::config::parse_target_url;

    fn target(url: &str) -> Target {
        let (base, query) = parse_target_url(url).unwrap();
        Target {
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
        }
    }

    #[test]
    fn the_request_path_is_appended_and_target_query_parameters_replace_the_clients() {
        let t = target("http://h:1/ingest/?sig=SECRET&sv=2");
        let pq = "/v1/logs?sig=client&x=1".parse().unwrap();
        assert_eq!(
            join_uri(&t, &pq).unwrap().to_string(),
            "http://h:1/ingest/v1/logs?x=1&sig=SECRET&sv=2"
        );
        let t = target("http://h:1");
        assert_eq!(
            join_uri(&t, &"/a?b".parse().unwrap()).unwrap().to_string(),
            "http://h:1/a?b"
        );
    }

    #[test]
    fn retry_after_takes_seconds_and_http_dates() {
        let now = SystemTime::UNIX_EPOCH + Duration::from_secs(1_000_000_000);
        let mut h = HeaderMap::new();
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("7"));
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(7)));
        let later = httpdate::fmt_http_date(now + Duration::from_secs(30));
        h.insert(header::RETRY_AFTER, HeaderValue::from_str(&later).unwrap());
        assert_eq!(retry_after(&h, now), Some(Duration::from_secs(30)));
        h.insert(header::RETRY_AFTER, HeaderValue::from_static("soon"));
        assert_eq!(retry_after(&h, now), None);
    }

    #[test]
    fn x_forwarded_for_is_appended_and_credentials_and_hop_by_hop_headers_are_dropped() {
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
        let out = end_to_end_headers(h, Some("127.0.0.1".parse().unwrap()));
        assert_eq!(out.get(&X_FORWARDED_FOR).unwrap(), "10.0.0.1, 127.0.0.1");
        assert!(out.get(header::AUTHORIZATION).is_none());
        assert!(out.get(header::CONNECTION).is_none());
        assert!(out.get(header::HOST).is_none());
        assert_eq!(out.get(header::CONTENT_TYPE).unwrap(), "application/json");
    }
}
