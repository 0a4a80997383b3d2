//! The inner TLS (`[tunnel] inner_tls = true`): the agent→relay HTTP/2 runs over mutual TLS 1.3
//! inside WireGuard, so that the hop is protected by approved cryptography whatever WireGuard
//! uses, and in FIPS mode by the FIPS module.
//!
//! Both sides trust only the deployment's private CA (`inner_tls_ca_file`, never the system or
//! webpki roots) and each pins the other by name: a relay's certificate (`xpart ca issue
//! --relay NAME`) names `NAME.relay.xpart` and is valid for server authentication, an agent's
//! (`xpart ca issue --agent NAME`) names `NAME.agent.xpart` and is valid for client
//! authentication, where NAME is the peer table's `name` on the other side. So an agent's
//! certificate cannot stand in for a relay's, and one agent's cannot stand in for another's:
//! the relay checks that the certificate names the `[[agent]]` whose tunnel address carried
//! the connection (WireGuard guarantees that address belongs to that peer's key).
//!
//! Only TLS 1.3 with AES-GCM (TLS13_AES_128_GCM_SHA256, TLS13_AES_256_GCM_SHA384) and the
//! NIST curves P-256 and P-384 are offered or accepted, in every build.

use std::path::{Path, PathBuf};
use std::sync::Arc;

use rustls::crypto::CryptoProvider;
use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use rustls::server::{ParsedCertificate, WebPkiClientVerifier};
use rustls::{CipherSuite, ClientConfig, NamedGroup, RootCertStore, ServerConfig};

/// The suites the inner TLS allows: FIPS-approved AES-GCM, TLS 1.3 only.
pub const CIPHER_SUITES: [CipherSuite; 2] = [
    CipherSuite::TLS13_AES_256_GCM_SHA384,
    CipherSuite::TLS13_AES_128_GCM_SHA256,
];

/// The key exchange groups the inner TLS allows: the FIPS-approved NIST curves.
pub const GROUPS: [NamedGroup; 2] = [NamedGroup::secp256r1, NamedGroup::secp384r1];

/// The DNS name (SAN) in a relay's inner-TLS certificate.
pub fn relay_name(name: &str) -> String {
    format!("{name}.relay.xpart")
}

/// The DNS name (SAN) in an agent's inner-TLS certificate.
pub fn agent_name(name: &str) -> String {
    format!("{name}.agent.xpart")
}

/// Whether `name` can be a peer's name in an inner-TLS certificate: one DNS label, lowercase.
pub fn is_valid_peer_name(name: &str) -> bool {
    !name.is_empty()
        && name.len() <= 63
        && !name.starts_with('-')
        && !name.ends_with('-')
        && name
            .bytes()
            .all(|b| b.is_ascii_lowercase() || b.is_ascii_digit() || b == b'-')
}

/// This side's certificate, its key, and the deployment CA that issued the peer's.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InnerTlsFiles {
    pub cert_file: PathBuf,
    pub key_file: PathBuf,
    pub ca_file: PathBuf,
}

/// Why the inner TLS could not be set up, naming the `[tunnel]` field and the fix.
#[derive(Debug, thiserror::Error)]
pub enum InnerTlsError {
    #[error("[tunnel].{field} {}: {reason} — fix: {fix}", path.display())]
    File {
        field: &'static str,
        path: PathBuf,
        reason: String,
        fix: &'static str,
    },
    #[error("[tunnel] inner TLS: {0} — fix: issue the certificates with `xpart ca issue --relay NAME` / `--agent NAME` from the deployment CA (keys are ECDSA P-256)")]
    Tls(rustls::Error),
    #[error("[tunnel] inner TLS: the provider of this build offers none of the suites or groups the inner TLS needs (TLS 1.3 AES-GCM, P-256/P-384) — fix: use an xpart build with the ring or AWS-LC FIPS provider")]
    Provider,
}

const ISSUE_FIX: &str = "point it at the PEM file written by `xpart ca issue --relay NAME` (relay) or `--agent NAME` (agent)";
const KEY_FIX: &str =
    "point it at the key written with the certificate by `xpart ca issue` (mode 0600)";
const CA_FIX: &str =
    "point it at the deployment CA's ca.pem (`xpart ca init`), the same file on agent and relay";

/// The agent's side: presents the agent's certificate, and accepts only a relay certificate
/// from the deployment CA (the name is checked per connection by the `ServerName` given to
/// the connector, [`relay_name`]).
pub fn client_config(files: &InnerTlsFiles) -> Result<Arc<ClientConfig>, InnerTlsError> {
    let provider = restricted_provider()?;
    let roots = read_roots(&files.ca_file)?;
    let (chain, key) = read_identity(files)?;
    let mut config = ClientConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(InnerTlsError::Tls)?
        .with_root_certificates(roots)
        .with_client_auth_cert(chain, key)
        .map_err(InnerTlsError::Tls)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// The relay's side: presents the relay's certificate and requires a client certificate from
/// the deployment CA; which agent it must name is checked after the handshake
/// ([`peer_certificate_names`]), where the connection's tunnel address is known.
pub fn server_config(files: &InnerTlsFiles) -> Result<Arc<ServerConfig>, InnerTlsError> {
    let provider = restricted_provider()?;
    let roots = Arc::new(read_roots(&files.ca_file)?);
    let verifier = WebPkiClientVerifier::builder_with_provider(roots, provider.clone())
        .build()
        .map_err(|e| InnerTlsError::Tls(rustls::Error::General(e.to_string())))?;
    let (chain, key) = read_identity(files)?;
    let mut config = ServerConfig::builder_with_provider(provider)
        .with_protocol_versions(&[&rustls::version::TLS13])
        .map_err(InnerTlsError::Tls)?
        .with_client_cert_verifier(verifier)
        .with_single_cert(chain, key)
        .map_err(InnerTlsError::Tls)?;
    config.alpn_protocols = vec![b"h2".to_vec()];
    Ok(Arc::new(config))
}

/// Whether the end-entity certificate the peer presented (already verified against the
/// deployment CA by the handshake) is valid for `name`.
pub fn peer_certificate_names(
    peer_certificates: Option<&[CertificateDer<'_>]>,
    name: &str,
) -> bool {
    let Some(end_entity) = peer_certificates.and_then(|certs| certs.first()) else {
        return false;
    };
    let Ok(parsed) = ParsedCertificate::try_from(end_entity) else {
        return false;
    };
    let Ok(server_name) = ServerName::try_from(name) else {
        return false;
    };
    rustls::client::verify_server_name(&parsed, &server_name).is_ok()
}

/// This build's provider cut down to [`CIPHER_SUITES`] and [`GROUPS`].
fn restricted_provider() -> Result<Arc<CryptoProvider>, InnerTlsError> {
    let base = crate::crypto::provider();
    let mut provider = CryptoProvider::clone(&base);
    provider
        .cipher_suites
        .retain(|suite| CIPHER_SUITES.contains(&suite.suite()));
    provider
        .kx_groups
        .retain(|group| GROUPS.contains(&group.name()));
    if provider.cipher_suites.is_empty() || provider.kx_groups.is_empty() {
        return Err(InnerTlsError::Provider);
    }
    Ok(Arc::new(provider))
}

fn read_roots(ca_file: &Path) -> Result<RootCertStore, InnerTlsError> {
    let error =
        |reason: &dyn std::fmt::Display| file_error("inner_tls_ca_file", ca_file, reason, CA_FIX);
    let mut roots = RootCertStore::empty();
    for cert in crate::pem::read_chain(ca_file).map_err(|e| error(&e))? {
        roots.add(cert).map_err(|e| error(&e))?;
    }
    Ok(roots)
}

fn read_identity(
    files: &InnerTlsFiles,
) -> Result<(Vec<CertificateDer<'static>>, PrivateKeyDer<'static>), InnerTlsError> {
    let chain = crate::pem::read_chain(&files.cert_file)
        .map_err(|e| file_error("inner_tls_cert_file", &files.cert_file, &e, ISSUE_FIX))?;
    let key = crate::pem::read_private_key(&files.key_file)
        .map_err(|e| file_error("inner_tls_key_file", &files.key_file, &e, KEY_FIX))?;
    Ok((chain, key))
}

fn file_error(
    field: &'static str,
    path: &Path,
    reason: &dyn std::fmt::Display,
    fix: &'static str,
) -> InnerTlsError {
    InnerTlsError::File {
        field,
        path: path.to_owned(),
        reason: reason.to_string(),
        fix,
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn peer_names_are_single_lowercase_labels() {
        assert!(is_valid_peer_name("relay-use1-az1"));
        assert!(is_valid_peer_name("agent0"));
        assert!(!is_valid_peer_name("Relay"));
        assert!(!is_valid_peer_name("relay.a"));
        assert!(!is_valid_peer_name("-relay"));
        assert!(!is_valid_peer_name(""));
        assert!(!is_valid_peer_name(&"a".repeat(64)));
    }

    #[test]
    fn the_restricted_provider_offers_only_tls13_aes_gcm_and_nist_curves() {
        let provider = restricted_provider().unwrap();
        let suites: Vec<CipherSuite> = provider.cipher_suites.iter().map(|s| s.suite()).collect();
        assert_eq!(suites.len(), 2, "{suites:?}");
        assert!(suites.iter().all(|s| CIPHER_SUITES.contains(s)));
        let groups: Vec<NamedGroup> = provider.kx_groups.iter().map(|g| g.name()).collect();
        assert!(!groups.is_empty());
        assert!(groups.iter().all(|g| GROUPS.contains(g)), "{groups:?}");
    }

    #[test]
    fn a_missing_ca_file_names_the_field_and_the_fix() {
        let files = InnerTlsFiles {
            cert_file: "/nonexistent/relay.pem".into(),
            key_file: "/nonexistent/relay.key".into(),
            ca_file: "/nonexistent/ca.pem".into(),
        };
        let err = server_config(&files).unwrap_err().to_string();
        assert!(
            err.starts_with("[tunnel].inner_tls_ca_file /nonexistent/ca.pem"),
            "{err}"
        );
        assert!(err.contains("xpart ca init"), "{err}");
    }

    #[test]
    fn no_certificate_names_nothing() {
        assert!(!peer_certificate_names(None, "a.agent.xpart"));
        assert!(!peer_certificate_names(Some(&[]), "a.agent.xpart"));
    }
}
