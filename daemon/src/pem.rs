//! The PEM files behind a TLS configuration (the agent's front, the inner TLS): a certificate
//! chain, and a private key only its owner may read. A [`PemError`] says what is wrong with
//! the file's contents or mode but not which file it is: the caller's error names it, with the
//! config field it came from and the fix.

use std::path::Path;

use rustls::pki_types::pem::PemObject;
use rustls::pki_types::{CertificateDer, PrivateKeyDer};

/// Why a PEM file gave no certificate chain or no key.
#[derive(Debug, thiserror::Error)]
pub enum PemError {
    #[error("{0}")]
    Pem(#[from] rustls::pki_types::pem::Error),
    #[error("holds no PEM certificate")]
    NoCertificate,
    /// The key file could not be read, or others may read it.
    #[error("{0}")]
    KeyFile(String),
}

/// Every certificate in the PEM file at `path`, in file order; at least one.
pub fn read_chain(path: &Path) -> Result<Vec<CertificateDer<'static>>, PemError> {
    let chain = CertificateDer::pem_file_iter(path)?.collect::<Result<Vec<_>, _>>()?;
    if chain.is_empty() {
        return Err(PemError::NoCertificate);
    }
    Ok(chain)
}

/// The private key in the PEM file at `path`, which must be readable by its owner alone
/// (`xpart_tunnel::keys::read_owner_only_file`).
pub fn read_private_key(path: &Path) -> Result<PrivateKeyDer<'static>, PemError> {
    let pem = xpart_tunnel::keys::read_owner_only_file(path).map_err(|e| {
        // The key error names the file itself; the caller's error adds it back, so the message
        // reads exactly as it does for a WireGuard key.
        let message = e.to_string();
        let prefix = format!("{}: ", path.display());
        PemError::KeyFile(message.strip_prefix(&prefix).unwrap_or(&message).to_owned())
    })?;
    Ok(PrivateKeyDer::from_pem_slice(&pem)?)
}
