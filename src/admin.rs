//! The admin listener: `/metrics`, `/healthz`, `/readyz`, `/status`,
//! `POST`/`DELETE /admin/active`.

use bytes::Bytes;
use http::header::{self, HeaderValue};
use http::{Method, Request, Response, StatusCode};
use http_body_util::{BodyExt, Full, Limited};
use serde::Deserialize;

use crate::app::{Control, SwitchError};

type Resp = Response<Full<Bytes>>;

/// Largest admin request body.
const MAX_ADMIN_BODY: usize = 64 << 10;
/// How long `POST /admin/active` waits for its (small) body.
const ADMIN_BODY_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(10);

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct SwitchRequest {
    target: String,
}

/// Routes one admin request.
pub async fn handle<B>(control: &Control, req: Request<B>) -> Resp
where
    B: hyper::body::Body<Data = Bytes>,
    B::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let path = req.uri().path().to_owned();
    let method = req.method().clone();
    match (path.as_str(), &method) {
        ("/metrics", &Method::GET) => {
            control.refresh_metrics();
            match control.metrics.render() {
                Ok(body) => with_type(
                    StatusCode::OK,
                    Bytes::from(body),
                    "text/plain; version=0.0.4; charset=utf-8",
                ),
                Err(e) => text(
                    StatusCode::INTERNAL_SERVER_ERROR,
                    format!("cannot render metrics: {e}\n"),
                ),
            }
        }
        ("/healthz", &Method::GET) => text(StatusCode::OK, "ok\n".into()),
        ("/readyz", &Method::GET) => {
            if control.ready() {
                text(StatusCode::OK, "ready\n".into())
            } else {
                text(StatusCode::SERVICE_UNAVAILABLE, "not ready\n".into())
            }
        }
        ("/status", &Method::GET) => json(StatusCode::OK, &control.status()),
        ("/admin/active", &Method::POST) => {
            if let Some(denied) = check_token(control, &req) {
                return denied;
            }
            let read = Limited::new(req.into_body(), MAX_ADMIN_BODY).collect();
            let body = match tokio::time::timeout(ADMIN_BODY_TIMEOUT, read).await {
                Ok(Ok(b)) => b.to_bytes(),
                Ok(Err(e)) => {
                    return text(StatusCode::BAD_REQUEST, format!("cannot read body: {e}\n"));
                }
                // A request in the service keeps its connection from the
                // idle sweep: a body that never comes must not hold an
                // admin connection slot for ever.
                Err(_) => {
                    return text(
                        StatusCode::REQUEST_TIMEOUT,
                        "request body not received in time\n".into(),
                    );
                }
            };
            let parsed: SwitchRequest = match serde_json::from_slice(&body) {
                Ok(p) => p,
                Err(e) => {
                    return text(
                        StatusCode::BAD_REQUEST,
                        format!("expected {{\"target\":\"<name>\"}}: {e}\n"),
                    );
                }
            };
            match control.switch(&parsed.target).await {
                Ok(()) => json(StatusCode::OK, &control.status()),
                Err(e @ SwitchError::UnknownTarget(_)) => {
                    text(StatusCode::NOT_FOUND, format!("{e}\n"))
                }
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        ("/admin/active", &Method::DELETE) => {
            if let Some(denied) = check_token(control, &req) {
                return denied;
            }
            match control.clear_switch().await {
                Ok(()) => json(StatusCode::OK, &control.status()),
                Err(e) => text(StatusCode::INTERNAL_SERVER_ERROR, format!("{e}\n")),
            }
        }
        ("/metrics" | "/healthz" | "/readyz" | "/status", _) => {
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n".into(),
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("GET"));
            r
        }
        ("/admin/active", _) => {
            let mut r = text(
                StatusCode::METHOD_NOT_ALLOWED,
                "method not allowed\n".into(),
            );
            r.headers_mut()
                .insert(header::ALLOW, HeaderValue::from_static("POST, DELETE"));
            r
        }
        _ => text(StatusCode::NOT_FOUND, "not found\n".into()),
    }
}

fn check_token<B>(control: &Control, req: &Request<B>) -> Option<Resp> {
    let token = control
        .admin_token
        .lock()
        .unwrap_or_else(|p| p.into_inner())
        .clone()?;
    let given = req
        .headers()
        .get(header::AUTHORIZATION)
        .and_then(|v| v.to_str().ok())
        .and_then(crate::proxy_headers::bearer_token)
        .map(str::trim);
    let ok = given.is_some_and(|g| {
        g.len() == token.len()
            && g.bytes()
                .zip(token.bytes())
                .fold(0u8, |acc, (a, b)| acc | (a ^ b))
                == 0
    });
    if ok {
        None
    } else {
        let mut r = text(StatusCode::UNAUTHORIZED, "admin token required\n".into());
        r.headers_mut()
            .insert(header::WWW_AUTHENTICATE, HeaderValue::from_static("Bearer"));
        Some(r)
    }
}

fn with_type(status: StatusCode, body: Bytes, content_type: &'static str) -> Resp {
    let mut r = Response::new(Full::new(body));
    *r.status_mut() = status;
    r.headers_mut()
        .insert(header::CONTENT_TYPE, HeaderValue::from_static(content_type));
    r
}

fn text(status: StatusCode, body: String) -> Resp {
    with_type(status, Bytes::from(body), "text/plain; charset=utf-8")
}

fn json(status: StatusCode, value: &serde_json::Value) -> Resp {
    let mut body = serde_json::to_vec_pretty(value).unwrap_or_default();
    body.push(b'\n');
    with_type(status, Bytes::from(body), "application/json")
}
