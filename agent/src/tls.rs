//! The TLS front's certificate: loaded at start, swapped on reload.
//!
//! Connections already established keep the session they negotiated; only handshakes after
//! a reload see the new certificate, so a reload never drops a connection. A reload that
//! fails (missing file, key that does not match, key file open to group or others) keeps
//! serving the previous certificate.

use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use rustls::crypto::CryptoProvider;
use rustls::server::{ClientHello, ResolvesServerCert};
use rustls::sign::CertifiedKey;
use rustls::ServerConfig;
use xpart_daemon::pem;

use crate::error::StartError;

/// The current certificate and where it came from.
#[derive(Debug)]
pub struct CertStore {
    cert_file: PathBuf,
    key_file: PathBuf,
    current: RwLock<Arc<CertifiedKey>>,
}

impl CertStore {
    pub fn load(cert_file: &Path, key_file: &Path) -> Result<CertStore, StartError> {
        let key = read_certified_key(cert_file, key_file)?;
        Ok(CertStore {
            cert_file: cert_file.to_owned(),
            key_file: key_file.to_owned(),
            current: RwLock::new(Arc::new(key)),
        })
    }

    /// Reads the files again and serves the result to new handshakes.
    pub fn reload(&self) -> Result<(), StartError> {
        let key = read_certified_key(&self.cert_file, &self.key_file)?;
        let mut current = self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *current = Arc::new(key);
        Ok(())
    }

    /// Serves `other`'s certificate to new handshakes: a reload reads and checks the files
    /// named by the new configuration first, and swaps only when they are usable.
    pub fn replace_with(&self, other: CertStore) {
        let key = other.current();
        let mut current = self
            .current
            .write()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        *current = key;
    }

    fn current(&self) -> Arc<CertifiedKey> {
        self.current
            .read()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
            .clone()
    }
}

impl ResolvesServerCert for CertStore {
    fn resolve(&self, _hello: ClientHello<'_>) -> Option<Arc<CertifiedKey>> {
        Some(self.current())
    }
}

/// rustls server settings for the front: the build's provider (ring, or AWS-LC's FIPS module in
/// FIPS mode, which offers only FIPS-approved suites and groups), TLS 1.2 and 1.3, ALPN h2 then
/// http/1.1.
pub fn server_config(store: Arc<CertStore>) -> Result<Arc<ServerConfig>, StartError> {
    let provider = xpart_daemon::crypto::provider();
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_safe_default_protocol_versions()
        .map_err(StartError::Tls)?
        .with_no_client_auth()
        .with_cert_resolver(store);
    config.alpn_protocols = vec![b"h2".to_vec(), b"http/1.1".to_vec()];
    Ok(Arc::new(config))
}

fn read_certified_key(cert_file: &Path, key_file: &Path) -> Result<CertifiedKey, StartError> {
    let error = |file: &Path, reason: String| StartError::Certificate {
        file: file.to_owned(),
        reason,
    };
    let certs = pem::read_chain(cert_file).map_err(|e| error(cert_file, e.to_string()))?;
    let key = pem::read_private_key(key_file).map_err(|e| error(key_file, e.to_string()))?;
    let provider: Arc<CryptoProvider> = xpart_daemon::crypto::provider();
    CertifiedKey::from_der(certs, key, &provider).map_err(|e| {
        let reason = format!(
            "key does not fit the certificate in {}: {e}",
            cert_file.display()
        );
        error(key_file, reason)
    })
}
