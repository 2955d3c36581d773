//! TLS with rustls. Each worker loads the certificate files when it boots,
//! so a reload picks up renewed certificates, and a generation whose files
//! are bad fails to boot and is rolled back (the old one keeps its
//! certificate). The master loads them too before it starts or reloads, to
//! say at once what is wrong.

use std::path::Path;
use std::sync::Arc;

use anyhow::{bail, Context};
use tokio_rustls::rustls::pki_types::pem::PemObject;
use tokio_rustls::rustls::pki_types::{CertificateDer, PrivateKeyDer};
use tokio_rustls::rustls::server::WebPkiClientVerifier;
use tokio_rustls::rustls::{RootCertStore, ServerConfig};
use tokio_rustls::TlsAcceptor;

use crate::config::Settings;

fn certificates(path: &Path, what: &str) -> anyhow::Result<Vec<CertificateDer<'static>>> {
    let certs = CertificateDer::pem_file_iter(path)
        .and_then(|iter| iter.collect::<Result<Vec<_>, _>>())
        .with_context(|| format!("{what} {}", path.display()))?;
    if certs.is_empty() {
        bail!("{what} {}: no PEM certificate in it", path.display());
    }
    Ok(certs)
}

/// The acceptor for these settings, or `None` without `certfile`.
pub(crate) fn acceptor(settings: &Settings) -> anyhow::Result<Option<TlsAcceptor>> {
    let (Some(certfile), Some(keyfile)) = (&settings.certfile, &settings.keyfile) else {
        return Ok(None);
    };
    let certs = certificates(certfile, "certfile")?;
    let key = PrivateKeyDer::from_pem_file(keyfile)
        .with_context(|| format!("keyfile {}", keyfile.display()))?;
    let provider = Arc::new(tokio_rustls::rustls::crypto::ring::default_provider());
    let builder = ServerConfig::builder_with_provider(Arc::clone(&provider))
        .with_safe_default_protocol_versions()?;
    let builder = match &settings.ca_certs {
        Some(ca) => {
            let mut roots = RootCertStore::empty();
            for cert in certificates(ca, "ca_certs")? {
                roots
                    .add(cert)
                    .with_context(|| format!("ca_certs {}", ca.display()))?;
            }
            let verifier = WebPkiClientVerifier::builder_with_provider(Arc::new(roots), provider)
                .build()
                .with_context(|| format!("ca_certs {}", ca.display()))?;
            builder.with_client_cert_verifier(verifier)
        }
        None => builder.with_no_client_auth(),
    };
    let mut config = builder.with_single_cert(certs, key).with_context(|| {
        format!(
            "certfile {} and keyfile {}",
            certfile.display(),
            keyfile.display()
        )
    })?;
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Some(TlsAcceptor::from(Arc::new(config))))
}
