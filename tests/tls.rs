//! HTTPS: HTTP/1.1 and HTTP/2 by ALPN, certificates renewed by a reload
//! with no failed request, and bad certificates refused.

mod common;

use std::net::SocketAddr;
use std::path::Path;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

use bytes::Bytes;
use common::*;
use http_body_util::{BodyExt, Empty};
use hyper_util::rt::{TokioExecutor, TokioIo};
use tokio_rustls::rustls::pki_types::{CertificateDer, ServerName};
use tokio_rustls::rustls::{ClientConfig, RootCertStore};

struct Cert {
    der: CertificateDer<'static>,
}

/// A fresh self-signed certificate for localhost, written to `dir`.
fn make_cert(dir: &Path) -> Cert {
    let certified = rcgen::generate_simple_self_signed(vec!["localhost".to_owned()]).unwrap();
    write_file(&dir.join("cert.pem.new"), &certified.cert.pem());
    write_file(
        &dir.join("key.pem.new"),
        &certified.signing_key.serialize_pem(),
    );
    std::fs::rename(dir.join("cert.pem.new"), dir.join("cert.pem")).unwrap();
    std::fs::rename(dir.join("key.pem.new"), dir.join("key.pem")).unwrap();
    Cert {
        der: certified.cert.der().clone(),
    }
}

fn client_config(trust: &[&Cert], alpn: &[u8]) -> Arc<ClientConfig> {
    let mut roots = RootCertStore::empty();
    for c in trust {
        roots.add(c.der.clone()).unwrap();
    }
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    config.alpn_protocols = vec![alpn.to_vec()];
    Arc::new(config)
}

/// One HTTPS GET on a new connection: (HTTP version, status, body, the
/// server's certificate).
async fn https_get(
    addr: SocketAddr,
    config: Arc<ClientConfig>,
) -> Result<(hyper::Version, u16, String, CertificateDer<'static>), String> {
    let tcp = tokio::net::TcpStream::connect(addr)
        .await
        .map_err(|e| e.to_string())?;
    let connector = tokio_rustls::TlsConnector::from(config);
    let tls = connector
        .connect(ServerName::try_from("localhost").unwrap(), tcp)
        .await
        .map_err(|e| format!("handshake: {e}"))?;
    let cert = tls
        .get_ref()
        .1
        .peer_certificates()
        .and_then(|c| c.first())
        .cloned()
        .ok_or("no certificate")?;
    let h2 = tls.get_ref().1.alpn_protocol() == Some(b"h2");
    let req = hyper::Request::get("https://localhost/")
        .body(Empty::<Bytes>::new())
        .unwrap();
    let res = if h2 {
        let (mut sender, conn) =
            hyper::client::conn::http2::handshake(TokioExecutor::new(), TokioIo::new(tls))
                .await
                .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        sender.send_request(req).await.map_err(|e| e.to_string())?
    } else {
        let (mut sender, conn) = hyper::client::conn::http1::handshake(TokioIo::new(tls))
            .await
            .map_err(|e| e.to_string())?;
        tokio::spawn(conn);
        sender.send_request(req).await.map_err(|e| e.to_string())?
    };
    let (version, status) = (res.version(), res.status().as_u16());
    let body = res
        .into_body()
        .collect()
        .await
        .map_err(|e| e.to_string())?
        .to_bytes();
    Ok((
        version,
        status,
        String::from_utf8_lossy(&body).into_owned(),
        cert,
    ))
}

#[test]
fn https_over_http1_and_http2_and_renewed_on_reload() {
    let dir = TempDir::new("tls");
    let first = make_cert(&dir.0);
    let cert = dir.path("cert.pem");
    let key = dir.path("key.pem");
    let server = Launch::serve(&[
        "--workers",
        "2",
        "--certfile",
        cert.to_str().unwrap(),
        "--keyfile",
        key.to_str().unwrap(),
    ])
    .start();
    server.wait_ready();
    assert!(
        server.log_text().contains("Listening at: https://"),
        "a TLS server says so"
    );
    let addr = server.addr();
    let rt = runtime();
    let (v, status, body, seen) = rt
        .block_on(https_get(addr, client_config(&[&first], b"http/1.1")))
        .unwrap();
    assert_eq!((v, status), (hyper::Version::HTTP_11, 200));
    assert!(body.contains("scheme=https"), "{body}");
    assert_eq!(seen, first.der);
    let (v, status, _, _) = rt
        .block_on(https_get(addr, client_config(&[&first], b"h2")))
        .unwrap();
    assert_eq!((v, status), (hyper::Version::HTTP_2, 200));

    // Renew the certificate, reload under load: nothing fails, new
    // connections see the new certificate.
    let second = make_cert(&dir.0);
    let config = client_config(&[&first, &second], b"http/1.1");
    let stop = Arc::new(AtomicBool::new(false));
    let done = Arc::new(std::sync::atomic::AtomicU64::new(0));
    let load = {
        let (stop, config, done) = (Arc::clone(&stop), Arc::clone(&config), Arc::clone(&done));
        rt.spawn(async move {
            let (mut ok, mut failed) = (0u32, Vec::new());
            while !stop.load(Ordering::Relaxed) {
                match https_get(addr, Arc::clone(&config)).await {
                    Ok((_, 200, _, _)) => {
                        ok += 1;
                        done.fetch_add(1, Ordering::Relaxed);
                    }
                    Ok((_, s, _, _)) => failed.push(format!("status {s}")),
                    Err(e) => failed.push(e),
                }
            }
            (ok, failed)
        })
    };
    let served = |n: u64| {
        assert!(
            wait_until(Duration::from_secs(60), || done.load(Ordering::Relaxed)
                >= n),
            "traffic stopped at {} requests",
            done.load(Ordering::Relaxed)
        )
    };
    served(10);
    server.signal(nix::sys::signal::Signal::SIGHUP);
    server.wait_for_log("Reload to generation 2 complete", Duration::from_secs(60));
    // Traffic goes on after the reload.
    served(done.load(Ordering::Relaxed) + 10);
    stop.store(true, Ordering::Relaxed);
    let (ok, failed) = rt.block_on(load).unwrap();
    assert!(
        failed.is_empty(),
        "{} failed: {:?}",
        failed.len(),
        &failed[..failed.len().min(5)]
    );
    assert!(ok > 10, "only {ok} requests");
    let (_, _, _, seen) = rt.block_on(https_get(addr, config)).unwrap();
    assert_eq!(
        seen, second.der,
        "the reload did not pick up the new certificate"
    );

    // A broken certificate on reload: rolled back, the current one stays.
    write_file(
        &cert,
        "-----BEGIN CERTIFICATE-----\nbroken\n-----END CERTIFICATE-----\n",
    );
    server.signal(nix::sys::signal::Signal::SIGHUP);
    server.wait_for_log(
        "Reload aborted, the old certificate stays",
        Duration::from_secs(60),
    );
    let (_, status, _, seen) = rt
        .block_on(https_get(addr, client_config(&[&second], b"h2")))
        .unwrap();
    assert_eq!((status, seen), (200, second.der));
}

#[test]
fn a_missing_or_bad_certificate_stops_the_start() {
    let dir = TempDir::new("tlsbad");
    let missing = dir.path("nope.pem");
    let out = Launch::serve(&[
        "--certfile",
        missing.to_str().unwrap(),
        "--keyfile",
        missing.to_str().unwrap(),
    ])
    .output();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_ne!(out.status.code(), Some(0));
    assert!(
        stderr.contains(&format!("certfile {}", missing.display())),
        "{stderr}"
    );
    let out = Launch::serve(&["--certfile", missing.to_str().unwrap()]).output();
    assert!(String::from_utf8_lossy(&out.stderr)
        .contains("setting `keyfile`: certfile needs a keyfile"));
}

#[test]
fn client_certificates_are_required_with_ca_certs() {
    use rcgen::{
        BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    };
    let dir = TempDir::new("mtls");
    let server_cert = make_cert(&dir.0);
    // A CA, and a client certificate it issued.
    let mut ca_params = CertificateParams::new(vec![]).unwrap();
    ca_params.is_ca = IsCa::Ca(BasicConstraints::Unconstrained);
    let ca_key = KeyPair::generate().unwrap();
    let ca_cert = ca_params.self_signed(&ca_key).unwrap();
    write_file(&dir.path("ca.pem"), &ca_cert.pem());
    let issuer = Issuer::new(ca_params, ca_key);
    let mut client_params = CertificateParams::new(vec!["client".to_owned()]).unwrap();
    client_params.extended_key_usages = vec![ExtendedKeyUsagePurpose::ClientAuth];
    let client_key = KeyPair::generate().unwrap();
    let client_cert = client_params.signed_by(&client_key, &issuer).unwrap();

    let path = |name: &str| dir.path(name).to_str().unwrap().to_owned();
    let (cert, key, ca) = (path("cert.pem"), path("key.pem"), path("ca.pem"));
    let server =
        Launch::serve(&["--certfile", &cert, "--keyfile", &key, "--ca-certs", &ca]).start();
    server.wait_ready();
    let rt = runtime();
    // Without a client certificate: refused.
    let anonymous = rt.block_on(https_get(
        server.addr(),
        client_config(&[&server_cert], b"http/1.1"),
    ));
    assert!(anonymous.is_err(), "served without a client certificate");
    // The refusal is the server's: a TLS alert that a certificate is
    // required (TLS 1.3 sends it after the client's half of the handshake).
    let alert = rt.block_on(async {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let tcp = tokio::net::TcpStream::connect(server.addr()).await.unwrap();
        let connector =
            tokio_rustls::TlsConnector::from(client_config(&[&server_cert], b"http/1.1"));
        let mut tls = match connector
            .connect(ServerName::try_from("localhost").unwrap(), tcp)
            .await
        {
            Ok(tls) => tls,
            Err(e) => return e.to_string(),
        };
        let _ = tls.write_all(b"GET / HTTP/1.1\r\nHost: t\r\n\r\n").await;
        let mut buf = [0u8; 64];
        match tls.read(&mut buf).await {
            Ok(n) => format!("read {n} bytes: {:?}", String::from_utf8_lossy(&buf[..n])),
            Err(e) => e.to_string(),
        }
    });
    assert!(alert.contains("CertificateRequired"), "{alert}");
    // With one the CA issued: served.
    let mut roots = RootCertStore::empty();
    roots.add(server_cert.der.clone()).unwrap();
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let key = tokio_rustls::rustls::pki_types::PrivateKeyDer::try_from(client_key.serialize_der())
        .unwrap();
    let config = ClientConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_client_auth_cert(vec![client_cert.der().clone()], key)
        .unwrap();
    let (_, status, _, _) = rt
        .block_on(https_get(server.addr(), Arc::new(config)))
        .unwrap();
    assert_eq!(status, 200);
}
