//! An in-process HTTP sink: the fake data product used by `forkd demo`, the
//! tests and the benchmarks.
//!
//! Built with [`SinkBuilder`]: scripted answers (status, delay, `Retry-After`,
//! hang, close mid-answer), it records every request it receives (method,
//! path, headers, body, arrival order), and it can be stopped and restarted on
//! the same port to play a region outage.

use std::collections::VecDeque;
use std::convert::Infallible;
use std::net::SocketAddr;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use bytes::Bytes;
use http::{HeaderMap, Method, Request, Response, StatusCode};
use http_body_util::combinators::BoxBody;
use http_body_util::{BodyExt, Full, StreamBody};
use hyper::body::{Frame, Incoming};
use tokio::net::{TcpListener, TcpSocket};
use tokio::sync::watch;
use tokio::task::JoinHandle;

use crate::server::{self, Limits};

/// How the sink answers one request.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Behavior {
    /// Answer this status at once.
    Status(u16),
    /// Answer this status with `Retry-After: secs`.
    RetryAfter(u16, u64),
    /// Wait, then answer this status.
    Delay(Duration, u16),
    /// Read the request, never answer.
    Hang,
    /// Send the status line and part of the body, then drop the connection.
    CloseMidAnswer,
    /// Answer this status with a body of this many bytes (`b'x'`).
    Body(u16, usize),
}

/// One request as the sink received it.
#[derive(Debug, Clone)]
pub struct Received {
    pub method: Method,
    pub path_and_query: String,
    pub headers: HeaderMap,
    pub body: Bytes,
    pub at: Instant,
    /// The status answered; `None` for a hang or a close mid-answer.
    pub status: Option<u16>,
}

#[derive(Debug, Default)]
struct Inner {
    script: VecDeque<Behavior>,
    default: Option<Behavior>,
    received: Vec<Received>,
}

/// Builds a [`Sink`].
#[derive(Debug, Default)]
pub struct SinkBuilder {
    script: Vec<Behavior>,
    default: Option<Behavior>,
    tls: Option<Arc<rustls::ServerConfig>>,
}

impl SinkBuilder {
    pub fn new() -> Self {
        Self::default()
    }

    /// Answers the next requests in this order, then the default.
    pub fn script(mut self, behaviors: impl IntoIterator<Item = Behavior>) -> Self {
        self.script.extend(behaviors);
        self
    }

    /// The answer once the script is used up (200 unless set).
    pub fn default_behavior(mut self, b: Behavior) -> Self {
        self.default = Some(b);
        self
    }

    /// Serves HTTPS with this config (its URL then starts with `https://`).
    pub fn tls(mut self, config: Arc<rustls::ServerConfig>) -> Self {
        self.tls = Some(config);
        self
    }

    /// Binds 127.0.0.1 on a free port and starts serving.
    pub async fn start(self) -> std::io::Result<Sink> {
        let socket = port_socket(SocketAddr::from(([127, 0, 0, 1], 0)))?;
        let listener = socket.listen(1024)?;
        let addr = listener.local_addr()?;
        let inner = Arc::new(Mutex::new(Inner {
            script: self.script.into(),
            default: self.default,
            received: Vec::new(),
        }));
        let mut sink = Sink {
            addr,
            inner,
            running: None,
            reserved: None,
            tls: self.tls.map(server::TlsSource::new),
        };
        sink.serve(listener);
        Ok(sink)
    }
}

/// A running (or stopped) sink.
#[derive(Debug)]
pub struct Sink {
    addr: SocketAddr,
    inner: Arc<Mutex<Inner>>,
    running: Option<(watch::Sender<bool>, JoinHandle<()>)>,
    tls: Option<server::TlsSource>,
    /// While stopped: a bound, non-listening socket that keeps the port, so
    /// that no other socket of this host takes it during the outage
    /// (connections are refused) and [`Sink::restart`] cannot fail.
    reserved: Option<TcpSocket>,
}

type SinkBody = BoxBody<Bytes, std::io::Error>;

impl Sink {
    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn addr(&self) -> SocketAddr {
        self.addr
    }

    /// `http://127.0.0.1:PORT`
    pub fn url(&self) -> String {
        let scheme = if self.tls.is_some() { "https" } else { "http" };
        format!("{scheme}://{}", self.addr)
    }

    /// Every request received so far, in arrival order.
    pub fn received(&self) -> Vec<Received> {
        self.lock().received.clone()
    }

    /// The requests answered with 2xx, in arrival order.
    pub fn delivered(&self) -> Vec<Received> {
        self.lock()
            .received
            .iter()
            .filter(|r| r.status.is_some_and(|s| (200..300).contains(&s)))
            .cloned()
            .collect()
    }

    /// Number of requests answered with 2xx so far.
    pub fn delivered_count(&self) -> usize {
        self.lock()
            .received
            .iter()
            .filter(|r| r.status.is_some_and(|s| (200..300).contains(&s)))
            .count()
    }

    /// Replaces the default answer.
    pub fn set_default(&self, b: Behavior) {
        self.lock().default = Some(b);
    }

    /// Appends to the script.
    pub fn push_script(&self, b: Behavior) {
        self.lock().script.push_back(b);
    }

    pub fn is_running(&self) -> bool {
        self.running.is_some()
    }

    /// Stops listening and closes every connection (an outage). The port
    /// stays reserved for [`Sink::restart`]: connections to it are refused.
    pub async fn stop(&mut self) {
        if let Some((stop, task)) = self.running.take() {
            // Reserve the port before the listener closes (both sockets use
            // SO_REUSEPORT); if that fails the port is only released.
            self.reserved = port_socket(self.addr).ok();
            let _ = stop.send(true);
            let _ = task.await;
        }
    }

    /// Listens again on the same port.
    pub async fn restart(&mut self) -> std::io::Result<()> {
        if self.running.is_some() {
            return Ok(());
        }
        let socket = match self.reserved.take() {
            Some(s) => s,
            None => port_socket(self.addr)?,
        };
        let listener = socket.listen(1024)?;
        self.serve(listener);
        Ok(())
    }

    fn serve(&mut self, listener: TcpListener) {
        let (stop, mut stop_rx) = watch::channel(false);
        let inner = self.inner.clone();
        let limits = Limits {
            shutdown_timeout: Duration::from_millis(200),
            ..Limits::default()
        };
        let task = tokio::spawn(server::serve(
            listener,
            limits,
            self.tls.clone(),
            move |req, _| {
                let inner = inner.clone();
                async move { answer(inner, req).await }
            },
            None,
            async move {
                let _ = stop_rx.wait_for(|v| *v).await;
            },
        ));
        self.running = Some((stop, task));
    }
}

/// A socket bound to `addr` with SO_REUSEADDR and SO_REUSEPORT, not yet listening.
fn port_socket(addr: SocketAddr) -> std::io::Result<TcpSocket> {
    let socket = TcpSocket::new_v4()?;
    socket.set_reuseaddr(true)?;
    socket.set_reuseport(true)?;
    socket.bind(addr)?;
    Ok(socket)
}

async fn answer(inner: Arc<Mutex<Inner>>, req: Request<Incoming>) -> Response<SinkBody> {
    let (parts, body) = req.into_parts();
    let body = match body.collect().await {
        Ok(b) => b.to_bytes(),
        Err(_) => return status(StatusCode::BAD_REQUEST, None),
    };
    let behavior = {
        let mut g = inner.lock().unwrap_or_else(|p| p.into_inner());
        let b = g
            .script
            .pop_front()
            .or_else(|| g.default.clone())
            .unwrap_or(Behavior::Status(200));
        let status = match &b {
            Behavior::Status(s)
            | Behavior::RetryAfter(s, _)
            | Behavior::Delay(_, s)
            | Behavior::Body(s, _) => Some(*s),
            Behavior::Hang | Behavior::CloseMidAnswer => None,
        };
        g.received.push(Received {
            method: parts.method.clone(),
            path_and_query: parts
                .uri
                .path_and_query()
                .map(|p| p.to_string())
                .unwrap_or_default(),
            headers: parts.headers.clone(),
            body,
            at: Instant::now(),
            status,
        });
        b
    };
    match behavior {
        Behavior::Status(s) => status(code(s), None),
        Behavior::RetryAfter(s, secs) => status(code(s), Some(secs)),
        Behavior::Delay(d, s) => {
            tokio::time::sleep(d).await;
            status(code(s), None)
        }
        Behavior::Body(s, len) => {
            let mut r = Response::new(
                Full::new(Bytes::from(vec![b'x'; len]))
                    .map_err(|e: Infallible| match e {})
                    .boxed(),
            );
            *r.status_mut() = code(s);
            r
        }
        Behavior::Hang => std::future::pending().await,
        Behavior::CloseMidAnswer => {
            let chunks: Vec<Result<Frame<Bytes>, std::io::Error>> = vec![
                Ok(Frame::data(Bytes::from_static(b"partial"))),
                Err(std::io::Error::other("sink closes mid-answer")),
            ];
            let mut r = Response::new(StreamBody::new(futures::stream::iter(chunks)).boxed());
            r.headers_mut().insert(
                http::header::CONTENT_LENGTH,
                http::HeaderValue::from_static("100"),
            );
            r
        }
    }
}

fn code(s: u16) -> StatusCode {
    StatusCode::from_u16(s).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR)
}

fn status(s: StatusCode, retry_after: Option<u64>) -> Response<SinkBody> {
    let mut r = Response::new(
        Full::new(Bytes::from_static(b"ok\n"))
            .map_err(|e: Infallible| match e {})
            .boxed(),
    );
    *r.status_mut() = s;
    if let Some(secs) = retry_after
        && let Ok(v) = http::HeaderValue::from_str(&secs.to_string())
    {
        r.headers_mut().insert(http::header::RETRY_AFTER, v);
    }
    r
}
