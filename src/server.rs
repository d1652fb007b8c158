//! The listener loop: HTTP/1.1 and h2c (prior knowledge) on one port via
//! hyper-util's auto builder, a connection limit, a header-read timeout, and
//! graceful shutdown.
//!
//! The caller hands in a bound listener and a shutdown future (the pattern of
//! tokio's mini-redis), so tests bind port 0 and stop the server at will.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::sync::{Arc, RwLock};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::net::TcpListener;
use tokio::sync::Semaphore;

/// Limits of one listener.
#[derive(Debug, Clone)]
pub struct Limits {
    pub max_connections: usize,
    pub header_read_timeout: Duration,
    /// How long shutdown waits for open connections to finish their requests.
    pub shutdown_timeout: Duration,
    /// Largest header block accepted (HTTP/1.1); larger gets 431.
    pub max_header_bytes: usize,
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            max_connections: 10_000,
            header_read_timeout: Duration::from_secs(10),
            shutdown_timeout: Duration::from_secs(30),
            max_header_bytes: 64 << 10,
        }
    }
}

/// The server TLS config in force, swapped on reload (certificate rotation).
#[derive(Clone, Debug)]
pub struct TlsSource(Arc<RwLock<Arc<rustls::ServerConfig>>>);

impl TlsSource {
    pub fn new(config: Arc<rustls::ServerConfig>) -> Self {
        TlsSource(Arc::new(RwLock::new(config)))
    }

    /// Replaces the config; connections accepted from now on use it.
    pub fn set(&self, config: Arc<rustls::ServerConfig>) {
        *self.0.write().unwrap_or_else(|p| p.into_inner()) = config;
    }

    fn acceptor(&self) -> tokio_rustls::TlsAcceptor {
        tokio_rustls::TlsAcceptor::from(self.0.read().unwrap_or_else(|p| p.into_inner()).clone())
    }
}

/// Serves `listener` until `shutdown` completes, then stops accepting and
/// lets open connections finish (up to `limits.shutdown_timeout`).
pub async fn serve<H, F, RB>(
    listener: TcpListener,
    limits: Limits,
    tls: Option<TlsSource>,
    handler: H,
    connections: Option<prometheus::IntGauge>,
    shutdown: impl Future<Output = ()>,
) where
    H: Fn(Request<Incoming>, SocketAddr) -> F + Clone + Send + Sync + 'static,
    F: Future<Output = Response<RB>> + Send + 'static,
    RB: hyper::body::Body<Data = Bytes> + Send + 'static,
    RB::Error: Into<Box<dyn std::error::Error + Send + Sync>>,
{
    let mut builder = auto::Builder::new(TokioExecutor::new());
    builder
        .http1()
        .timer(TokioTimer::new())
        .header_read_timeout(limits.header_read_timeout)
        .max_buf_size(limits.max_header_bytes.max(8192))
        .keep_alive(true);
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX));
    let builder = Arc::new(builder);
    let slots = Arc::new(Semaphore::new(limits.max_connections.max(1)));
    let graceful = GracefulShutdown::new();
    tokio::pin!(shutdown);
    loop {
        let permit = tokio::select! {
            p = slots.clone().acquire_owned() => match p { Ok(p) => p, Err(_) => break },
            () = &mut shutdown => break,
        };
        let (stream, remote) = tokio::select! {
            accepted = listener.accept() => match accepted {
                Ok(a) => a,
                Err(e) => {
                    // EMFILE and friends: back off briefly instead of spinning.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
            () = &mut shutdown => break,
        };
        let _ = stream.set_nodelay(true);
        let handler = handler.clone();
        let service = service_fn(move |req: Request<Incoming>| {
            let handler = handler.clone();
            async move { Ok::<_, Infallible>(handler(req, remote).await) }
        });
        let builder = builder.clone();
        let watcher = graceful.watcher();
        let gauge = connections.clone();
        let tls = tls.as_ref().map(TlsSource::acceptor);
        let handshake_timeout = limits.header_read_timeout;
        tokio::spawn(async move {
            if let Some(g) = &gauge {
                g.inc();
            }
            let result = match tls {
                None => {
                    let conn = builder.serve_connection(TokioIo::new(stream), service);
                    watcher.watch(conn.into_owned()).await
                }
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            let conn = builder.serve_connection(TokioIo::new(tls_stream), service);
                            watcher.watch(conn.into_owned()).await
                        }
                        Ok(Err(e)) => Err(format!("TLS handshake failed: {e}").into()),
                        Err(_) => Err("TLS handshake timed out".into()),
                    }
                }
            };
            if let Err(e) = result {
                tracing::debug!(%remote, error = %e, "connection ended with an error");
            }
            if let Some(g) = &gauge {
                g.dec();
            }
            drop(permit);
        });
    }
    drop(listener);
    tokio::select! {
        () = graceful.shutdown() => {}
        () = tokio::time::sleep(limits.shutdown_timeout) => {
            tracing::warn!("shutdown timeout reached with connections still open");
        }
    }
}
