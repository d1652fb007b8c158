//! The listener loop: HTTP/1.1 and h2c (prior knowledge) on one port via
//! hyper-util's auto builder, a connection limit, a header-read timeout, and
//! graceful shutdown.
//!
//! The caller hands in a bound listener and a shutdown future (the pattern of
//! tokio's mini-redis), so tests bind port 0 and stop the server at will.

use std::convert::Infallible;
use std::future::Future;
use std::net::SocketAddr;
use std::pin::Pin;
use std::sync::{Arc, RwLock};
use std::task::{Context, Poll};
use std::time::Duration;

use bytes::Bytes;
use http::{Request, Response};
use hyper::body::Incoming;
use hyper::service::service_fn;
use hyper_util::rt::{TokioExecutor, TokioIo, TokioTimer};
use hyper_util::server::conn::auto;
use hyper_util::server::graceful::GracefulShutdown;
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, ReadBuf};
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
    // An HTTP/2 peer that stops answering PINGs (one that sent a preface
    // and then nothing) is closed instead of holding a connection slot.
    builder
        .http2()
        .timer(TokioTimer::new())
        .max_header_list_size(u32::try_from(limits.max_header_bytes).unwrap_or(u32::MAX))
        .keep_alive_interval(limits.header_read_timeout)
        .keep_alive_timeout(limits.header_read_timeout);
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
                None => match with_preface(stream, handshake_timeout).await {
                    Ok(io) => {
                        let conn = builder.serve_connection(TokioIo::new(io), service);
                        watcher.watch(conn.into_owned()).await
                    }
                    Err(e) => Err(e.into()),
                },
                Some(acceptor) => {
                    match tokio::time::timeout(handshake_timeout, acceptor.accept(stream)).await {
                        Ok(Ok(tls_stream)) => {
                            match with_preface(tls_stream, handshake_timeout).await {
                                Ok(io) => {
                                    let conn = builder.serve_connection(TokioIo::new(io), service);
                                    watcher.watch(conn.into_owned()).await
                                }
                                Err(e) => Err(e.into()),
                            }
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

/// The first bytes of an HTTP/2 connection with prior knowledge (RFC 9113 §3.4).
const H2_PREFACE: &[u8] = b"PRI * HTTP/2.0\r\n\r\nSM\r\n\r\n";

/// Reads a connection's first bytes within `timeout` and hands back a stream
/// that replays them.
///
/// hyper-util's auto builder reads them too, to tell HTTP/1.1 from an HTTP/2
/// preface, but without a deadline, and hyper's own header timeout starts
/// only after that: a client that connects and sends nothing, or trickles
/// the preface, would hold a connection slot for ever. This bounds that
/// phase by `header_read_timeout` as well.
async fn with_preface<S>(mut io: S, timeout: Duration) -> Result<Prefixed<S>, String>
where
    S: AsyncRead + Unpin,
{
    let read = async {
        let mut prefix = Vec::with_capacity(H2_PREFACE.len());
        let mut chunk = [0u8; H2_PREFACE.len()];
        // Up to the whole preface, stopping at the first byte that differs.
        while prefix.len() < H2_PREFACE.len() && H2_PREFACE.starts_with(&prefix) {
            let n = io
                .read(&mut chunk[..H2_PREFACE.len() - prefix.len()])
                .await?;
            if n == 0 {
                break;
            }
            prefix.extend_from_slice(&chunk[..n]);
        }
        Ok::<_, std::io::Error>(prefix)
    };
    match tokio::time::timeout(timeout, read).await {
        Ok(Ok(prefix)) => Ok(Prefixed { prefix, pos: 0, io }),
        Ok(Err(e)) => Err(format!("reading the first bytes failed: {e}")),
        Err(_) => Err("no request within header_read_timeout".into()),
    }
}

/// A stream whose first bytes were read already: they are read again first.
struct Prefixed<S> {
    prefix: Vec<u8>,
    pos: usize,
    io: S,
}

impl<S: AsyncRead + Unpin> AsyncRead for Prefixed<S> {
    fn poll_read(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &mut ReadBuf<'_>,
    ) -> Poll<std::io::Result<()>> {
        let this = &mut *self;
        if this.pos < this.prefix.len() {
            let n = (this.prefix.len() - this.pos).min(buf.remaining());
            buf.put_slice(&this.prefix[this.pos..this.pos + n]);
            this.pos += n;
            return Poll::Ready(Ok(()));
        }
        Pin::new(&mut this.io).poll_read(cx, buf)
    }
}

impl<S: AsyncWrite + Unpin> AsyncWrite for Prefixed<S> {
    fn poll_write(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        buf: &[u8],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write(cx, buf)
    }

    fn poll_write_vectored(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
        bufs: &[std::io::IoSlice<'_>],
    ) -> Poll<std::io::Result<usize>> {
        Pin::new(&mut self.io).poll_write_vectored(cx, bufs)
    }

    fn is_write_vectored(&self) -> bool {
        self.io.is_write_vectored()
    }

    fn poll_flush(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_flush(cx)
    }

    fn poll_shutdown(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<std::io::Result<()>> {
        Pin::new(&mut self.io).poll_shutdown(cx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    type TestResult = Result<(), Box<dyn std::error::Error>>;

    #[tokio::test]
    async fn the_first_bytes_are_read_and_replayed_in_order() -> TestResult {
        for sent in [
            &b"POST / HTTP/1.1\r\nHost: x\r\n\r\n"[..],
            b"PRI * HTTP/1.1\r\n",
            H2_PREFACE,
            b"PRI",
            b"",
        ] {
            let (mut client, server) = tokio::io::duplex(64);
            tokio::io::AsyncWriteExt::write_all(&mut client, sent).await?;
            drop(client);
            let mut p = with_preface(server, Duration::from_secs(5)).await?;
            let mut all = Vec::new();
            p.read_to_end(&mut all).await?;
            assert_eq!(all, sent, "every byte is replayed, in order");
        }
        Ok(())
    }

    #[tokio::test]
    async fn a_client_that_sends_nothing_or_half_a_preface_is_refused_after_the_timeout()
    -> TestResult {
        for sent in [&b""[..], b"PRI * HTTP/2.0\r\n"] {
            let (mut client, server) = tokio::io::duplex(64);
            tokio::io::AsyncWriteExt::write_all(&mut client, sent).await?;
            let r = with_preface(server, Duration::from_millis(50)).await;
            assert!(r.is_err(), "{sent:?}");
            drop(client);
        }
        Ok(())
    }
}
