#![allow(clippy::unwrap_used, clippy::expect_used, clippy::panic)]
//! TLS: `https://` targets (trusted through `ca_file`, refused otherwise with
//! `reason="tls"`), and `server.tls` on the ingest listener (HTTP/1.1 and h2
//! by ALPN), with certificate rotation on reload.

#[path = "common/mod.rs"]
mod common;

use std::path::Path;
use std::sync::Arc;

use bytes::Bytes;
use common::{Conf, Daemon, wait_for};
use forkd::sink::SinkBuilder;
use http::Request;
use http_body_util::{BodyExt, Full};
use hyper_util::client::legacy::Client;
use hyper_util::rt::TokioExecutor;
use rustls::pki_types::CertificateDer;
use rustls::pki_types::pem::PemObject;

/// A self-signed certificate for 127.0.0.1 and localhost, written as PEM files.
struct Cert {
    cert_pem: String,
    key_pem: String,
}

impl Cert {
    fn new() -> Cert {
        let ck = rcgen::generate_simple_self_signed(vec![
            "localhost".to_owned(),
            "127.0.0.1".to_owned(),
        ])
        .unwrap();
        Cert {
            cert_pem: ck.cert.pem(),
            key_pem: ck.signing_key.serialize_pem(),
        }
    }

    fn write(&self, dir: &Path, name: &str) -> (std::path::PathBuf, std::path::PathBuf) {
        let cert = dir.join(format!("{name}.crt"));
        let key = dir.join(format!("{name}.key"));
        std::fs::write(&cert, &self.cert_pem).unwrap();
        std::fs::write(&key, &self.key_pem).unwrap();
        (cert, key)
    }

    fn server_config(&self, dir: &Path, name: &str) -> Arc<rustls::ServerConfig> {
        let (cert, key) = self.write(dir, name);
        forkd::tls::server_config(&forkd::config::TlsConfig { cert, key }).unwrap()
    }

    fn der(&self) -> CertificateDer<'static> {
        CertificateDer::from_pem_slice(self.cert_pem.as_bytes()).unwrap()
    }
}

fn https_client(
    trust: &Cert,
    h2: bool,
) -> Client<
    hyper_rustls::HttpsConnector<hyper_util::client::legacy::connect::HttpConnector>,
    Full<Bytes>,
> {
    let config = forkd::tls::client_config(&[trust.der()]).unwrap();
    let builder = hyper_rustls::HttpsConnectorBuilder::new()
        .with_tls_config(config)
        .https_only();
    let connector = if h2 {
        builder.enable_http2().build()
    } else {
        builder.enable_http1().build()
    };
    let mut b = Client::builder(TokioExecutor::new());
    b.http2_only(h2);
    b.build(connector)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_target_trusted_through_ca_file_gets_the_request() {
    let files = tempfile::tempdir().unwrap();
    let cert = Cert::new();
    let sink = SinkBuilder::new()
        .tls(cert.server_config(files.path(), "sink"))
        .start()
        .await
        .unwrap();
    assert!(sink.url().starts_with("https://"));
    let (ca, _) = cert.write(files.path(), "ca");
    let d = Daemon::start(&Conf::new().target("primary", &sink.url()).target_line(
        "primary",
        &format!("ca_file = {:?}", ca.display().to_string()),
    ))
    .await;

    let reply = d.post("/v1/logs", "over tls").await;

    assert_eq!(reply.status, 200, "{}", reply.text());
    let got = sink.delivered();
    assert_eq!(got.len(), 1);
    assert_eq!(got[0].body, "over tls");
    assert_eq!(d.target_result("primary", "delivered").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_https_target_with_an_untrusted_certificate_is_a_tls_failure_and_the_request_is_spooled()
{
    let files = tempfile::tempdir().unwrap();
    let cert = Cert::new();
    let sink = SinkBuilder::new()
        .tls(cert.server_config(files.path(), "sink"))
        .start()
        .await
        .unwrap();
    let d = Daemon::start(&Conf::new().target("primary", &sink.url())).await;

    let reply = d.post("/v1/logs", "untrusted").await;

    assert_eq!(reply.status, 202, "spooled: {}", reply.text());
    assert!(sink.delivered().is_empty(), "sent to an untrusted server");
    let tls_failures = d
        .metric(
            "forkd_target_attempt_failures_total",
            &[("target", "primary"), ("reason", "tls")],
        )
        .await;
    assert!(tls_failures >= 1.0, "tls failures: {tls_failures}");
    assert_eq!(d.target_result("primary", "spooled").await, 1.0);
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn the_ingest_listener_serves_https_over_http1_and_h2_and_forks_the_request() {
    let files = tempfile::tempdir().unwrap();
    let cert = Cert::new();
    let (cert_path, key_path) = cert.write(files.path(), "server");
    let primary = common::sink().await;
    let backup = common::sink().await;
    let d = Daemon::start(&Conf::pair(&primary, &backup).server(&format!(
        "tls = {{ cert = {:?}, key = {:?} }}",
        cert_path.display().to_string(),
        key_path.display().to_string()
    )))
    .await;
    let url = format!("https://127.0.0.1:{}/v1/logs", d.running().addr.port());

    for (i, h2) in [false, true].into_iter().enumerate() {
        let client = https_client(&cert, h2);
        let resp = client
            .request(
                Request::post(&url)
                    .body(Full::new(Bytes::from(format!("tls-{i}"))))
                    .unwrap(),
            )
            .await
            .unwrap();
        assert_eq!(resp.status(), 200);
        assert_eq!(
            resp.version(),
            if h2 {
                http::Version::HTTP_2
            } else {
                http::Version::HTTP_11
            }
        );
        let _ = resp.into_body().collect().await.unwrap();
    }
    for sink in [&primary, &backup] {
        let bodies: Vec<Bytes> = sink.delivered().into_iter().map(|r| r.body).collect();
        assert_eq!(bodies, vec![Bytes::from("tls-0"), Bytes::from("tls-1")]);
    }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_reload_rotates_the_listener_certificate() {
    let files = tempfile::tempdir().unwrap();
    let old = Cert::new();
    let new = Cert::new();
    let (cert_path, key_path) = old.write(files.path(), "server");
    let primary = common::sink().await;
    let conf = Conf::new()
        .target("primary", &primary.url())
        .server(&format!(
            "tls = {{ cert = {:?}, key = {:?} }}",
            cert_path.display().to_string(),
            key_path.display().to_string()
        ));
    let d = Daemon::start(&conf).await;
    let url = format!("https://127.0.0.1:{}/x", d.running().addr.port());
    let post = |trust: &Cert| {
        let client = https_client(trust, false);
        let url = url.clone();
        async move {
            client
                .request(
                    Request::post(&url)
                        .body(Full::new(Bytes::from("r")))
                        .unwrap(),
                )
                .await
                .map(|r| r.status().as_u16())
        }
    };
    assert_eq!(post(&old).await.unwrap(), 200);
    assert!(
        post(&new).await.is_err(),
        "the new certificate is not served yet"
    );

    new.write(files.path(), "server");
    d.reload(&conf).await.unwrap();

    wait_for("the rotated certificate to be served", async || {
        post(&new).await.is_ok()
    })
    .await;
    assert!(
        post(&old).await.is_err(),
        "the old certificate is still served"
    );
}

#[test]
fn a_missing_or_unreadable_certificate_is_a_config_error_naming_the_key() {
    let files = tempfile::tempdir().unwrap();
    let path = files.path().join("forkd.toml");
    std::fs::write(files.path().join("garbage.pem"), "not a certificate").unwrap();
    std::fs::write(
        &path,
        format!(
            "[server]\nlisten = \"127.0.0.1:0\"\ntls = {{ cert = {:?}, key = {:?} }}\n\
             [admin]\nlisten = \"127.0.0.1:0\"\n\
             [targets.primary]\nurl = \"https://127.0.0.1:1\"\nca_file = {:?}\n\
             [buffer]\ndir = {:?}\n",
            files.path().join("missing.crt").display().to_string(),
            files.path().join("missing.key").display().to_string(),
            files.path().join("garbage.pem").display().to_string(),
            files.path().join("spool").display().to_string(),
        ),
    )
    .unwrap();

    let err = forkd::config::Config::load(&path).unwrap_err();

    assert!(
        err.problems
            .iter()
            .any(|p| p.starts_with("server.tls.cert: ")),
        "{err}"
    );
    assert!(
        err.problems
            .iter()
            .any(|p| p.starts_with("targets.primary.ca_file: ")),
        "{err}"
    );
}
