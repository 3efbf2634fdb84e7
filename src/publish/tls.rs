//! TLS to the broker through rustls with the ring provider (aws-lc, rumqttc's
//! default, needs cmake and a long C build for no gain here).

use std::path::Path;
use std::sync::Arc;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};
use rustls::{ClientConfig, RootCertStore};

use super::config::TlsConfig;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("mqtt.tls.{field} {path}: {source}")]
    Read { field: &'static str, path: String, source: std::io::Error },
    /// Messages embed their cause (`{source}`) so that a plain `{e}` reads
    /// whole; `base::report::chain` does not repeat it.
    #[error("mqtt.tls.{field} {path}: {what}: {source}")]
    Pem { field: &'static str, path: String, what: &'static str, source: rustls::pki_types::pem::Error },
    #[error("mqtt.tls.{field} {path}: no CERTIFICATE in the PEM file")]
    NoCertificate { field: &'static str, path: String },
    #[error("mqtt.tls: {0}")]
    Rustls(#[from] rustls::Error),
}

fn read(field: &'static str, path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { field, path: path.display().to_string(), source })
}

fn certs(field: &'static str, path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let pem = read(field, path)?;
    let certs = CertificateDer::pem_slice_iter(&pem)
        .collect::<Result<Vec<_>, _>>()
        .map_err(|source| TlsError::Pem { field, path: path.display().to_string(), what: "bad PEM", source })?;
    if certs.is_empty() {
        return Err(TlsError::NoCertificate { field, path: path.display().to_string() });
    }
    Ok(certs)
}

/// Builds the client's rustls config: trust exactly the CA(s) in `ca_file`,
/// and present `cert_file`/`key_file` when the broker wants mutual TLS.
pub fn client_config(cfg: &TlsConfig) -> Result<Arc<ClientConfig>, TlsError> {
    let mut roots = RootCertStore::empty();
    for ca in certs("ca_file", &cfg.ca_file)? {
        roots.add(ca)?;
    }
    let builder = ClientConfig::builder_with_provider(Arc::new(rustls::crypto::ring::default_provider()))
        .with_safe_default_protocol_versions()?
        .with_root_certificates(roots);
    let config = match (&cfg.cert_file, &cfg.key_file) {
        (Some(cert), Some(key)) => {
            let chain = certs("cert_file", cert)?;
            let pem = read("key_file", key)?;
            let key = PrivateKeyDer::from_pem_slice(&pem).map_err(|source| TlsError::Pem {
                field: "key_file",
                path: key.display().to_string(),
                what: "no usable private key",
                source,
            })?;
            builder.with_client_auth_cert(chain, key)?
        }
        _ => builder.with_no_client_auth(),
    };
    Ok(Arc::new(config))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn missing_and_empty_ca_files_name_the_field() {
        let dir = tempfile::tempdir().unwrap();
        let e = client_config(&TlsConfig { ca_file: dir.path().join("nope.pem"), cert_file: None, key_file: None })
            .unwrap_err();
        assert!(e.to_string().starts_with("mqtt.tls.ca_file"), "{e}");
        let empty = dir.path().join("empty.pem");
        std::fs::write(&empty, "").unwrap();
        let e = client_config(&TlsConfig { ca_file: empty, cert_file: None, key_file: None }).unwrap_err();
        assert!(e.to_string().contains("no CERTIFICATE"), "{e}");
    }
}
