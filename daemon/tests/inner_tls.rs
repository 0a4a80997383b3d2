//! The inner TLS's two configurations against each other over an in-memory pipe: mutual TLS
//! 1.3 with the deployment CA, each side pinned by name and role. (Its `[tunnel]` settings are
//! checked with the rest of the section, in `tunnel_config.rs`.)

use std::path::{Path, PathBuf};

use rcgen::{
    BasicConstraints, CertificateParams, ExtendedKeyUsagePurpose, IsCa, Issuer, KeyPair,
    KeyUsagePurpose,
};
use rustls::pki_types::ServerName;
use rustls::{CipherSuite, ProtocolVersion};
use tokio_rustls::{TlsAcceptor, TlsConnector};
use xpart_daemon::inner_tls::{
    agent_name, client_config, peer_certificate_names, relay_name, server_config, InnerTlsFiles,
};

struct Pki {
    dir: PathBuf,
    ca: KeyPair,
    ca_params: CertificateParams,
}

impl Pki {
    fn new(tag: &str) -> Pki {
        let dir =
            std::env::temp_dir().join(format!("xpart-inner-tls-{tag}-{}", std::process::id()));
        std::fs::create_dir_all(&dir).expect("test setup");
        let ca = KeyPair::generate().expect("test setup");
        let mut ca_params = CertificateParams::new(Vec::<String>::new()).expect("test setup");
        ca_params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
        ca_params.key_usages = vec![
            KeyUsagePurpose::KeyCertSign,
            KeyUsagePurpose::DigitalSignature,
        ];
        let cert = ca_params.self_signed(&ca).expect("test setup");
        std::fs::write(dir.join("ca.pem"), cert.pem()).expect("test setup");
        Pki { dir, ca, ca_params }
    }

    /// An agent's client certificate for `name`, as the deployment CA issues it.
    fn agent(&self, name: &str) -> InnerTlsFiles {
        self.issue(
            "agent",
            &format!("{name}.agent.xpart"),
            ExtendedKeyUsagePurpose::ClientAuth,
        )
    }

    /// A relay's server certificate for `name`, as the deployment CA issues it.
    fn relay(&self, name: &str) -> InnerTlsFiles {
        self.issue(
            "relay",
            &format!("{name}.relay.xpart"),
            ExtendedKeyUsagePurpose::ServerAuth,
        )
    }

    /// Files for a leaf named `dns` with `usage`, issued by this CA.
    fn issue(&self, file: &str, dns: &str, usage: ExtendedKeyUsagePurpose) -> InnerTlsFiles {
        let issuer = Issuer::from_params(&self.ca_params, &self.ca);
        let key = KeyPair::generate().expect("test setup");
        let mut params = CertificateParams::new(vec![dns.to_string()]).expect("test setup");
        params.extended_key_usages = vec![usage];
        let cert = params.signed_by(&key, &issuer).expect("test setup");
        let cert_file = self.dir.join(format!("{file}.pem"));
        let key_file = self.dir.join(format!("{file}.key"));
        std::fs::write(&cert_file, cert.pem()).expect("test setup");
        write_private(&key_file, &key.serialize_pem());
        InnerTlsFiles {
            cert_file,
            key_file,
            ca_file: self.dir.join("ca.pem"),
        }
    }
}

fn write_private(path: &Path, text: &str) {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    let mut file = std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(0o600)
        .open(path)
        .expect("test setup");
    file.write_all(text.as_bytes()).expect("test setup");
}

/// The client's negotiated suite and version, and whether the server found the client's
/// certificate naming the agent it expected; each an error message when its handshake failed.
type Outcomes = (
    Result<(CipherSuite, ProtocolVersion), String>,
    Result<bool, String>,
);

/// Runs both handshakes; the server's outcome carries whether the client's certificate names
/// `expected_agent`.
async fn handshake(
    agent: &InnerTlsFiles,
    relay: &InnerTlsFiles,
    relay_called: &str,
    expected_agent: &str,
) -> Outcomes {
    let connector = TlsConnector::from(client_config(agent).expect("test setup"));
    let acceptor = TlsAcceptor::from(server_config(relay).expect("test setup"));
    let (client_io, server_io) = tokio::io::duplex(64 * 1024);
    let name = ServerName::try_from(relay_name(relay_called)).expect("test setup");
    let expected = agent_name(expected_agent);
    let server = async move {
        let stream = acceptor
            .accept(server_io)
            .await
            .map_err(|e| e.to_string())?;
        Ok(peer_certificate_names(
            stream.get_ref().1.peer_certificates(),
            &expected,
        ))
    };
    // The client's stream is kept until the server is done: a TLS 1.3 server writes its
    // session tickets after the handshake, and a closed pipe would fail them.
    let (closed_tx, closed_rx) = tokio::sync::oneshot::channel::<()>();
    let client = async move {
        let stream = connector
            .connect(name, client_io)
            .await
            .map_err(|e| e.to_string())?;
        let connection = stream.get_ref().1;
        let negotiated = (
            connection
                .negotiated_cipher_suite()
                .expect("a finished handshake has a suite")
                .suite(),
            connection
                .protocol_version()
                .expect("a finished handshake has a version"),
        );
        let _ = closed_rx.await;
        Ok(negotiated)
    };
    let server = async move {
        let outcome = server.await;
        let _ = closed_tx.send(());
        outcome
    };
    tokio::join!(client, server)
}

/// Agent `agent` dials relay `relay-a`, which expects agent `agent-a`; both certificates are
/// issued as they should be by a fresh deployment CA (`tag` names its directory).
async fn handshake_as(tag: &str, agent: &str, relay: &str) -> Outcomes {
    let pki = Pki::new(tag);
    handshake(&pki.agent(agent), &pki.relay(relay), "relay-a", "agent-a").await
}

#[tokio::test]
async fn agent_and_relay_agree_on_tls13_aes_gcm_and_each_names_the_other() {
    let (client, server) = handshake_as("ok", "agent-a", "relay-a").await;
    let (suite, version) = client.unwrap();
    assert_eq!(version, ProtocolVersion::TLSv1_3);
    assert!(
        [
            CipherSuite::TLS13_AES_256_GCM_SHA384,
            CipherSuite::TLS13_AES_128_GCM_SHA256
        ]
        .contains(&suite),
        "{suite:?}"
    );
    assert_eq!(server, Ok(true));
}

#[tokio::test]
async fn another_agents_certificate_is_told_apart_after_the_handshake() {
    let (_, server) = handshake_as("other-agent", "agent-b", "relay-a").await;
    assert_eq!(server, Ok(false));
}

#[tokio::test]
async fn the_agent_refuses_a_relay_certificate_for_another_relay() {
    let (client, _) = handshake_as("other-relay", "agent-a", "relay-b").await;
    let err = client.unwrap_err();
    assert!(err.contains("not valid for name"), "{err}");
}

#[tokio::test]
async fn an_agent_certificate_cannot_serve_as_a_relay() {
    let pki = Pki::new("role");
    let agent = pki.agent("agent-a");
    // A client-auth certificate carrying a relay's name: the role is checked, not only the name.
    let relay = pki.issue(
        "relay",
        "relay-a.relay.xpart",
        ExtendedKeyUsagePurpose::ClientAuth,
    );
    let (client, _) = handshake(&agent, &relay, "relay-a", "agent-a").await;
    assert!(client.is_err(), "{client:?}");
}

#[tokio::test]
async fn a_certificate_from_another_ca_is_refused_by_the_relay() {
    let pki = Pki::new("ca-a");
    let stranger = Pki::new("ca-b");
    let mut agent = stranger.agent("agent-a");
    // The agent trusts the right CA for the relay, but its own certificate is a stranger's.
    agent.ca_file = pki.dir.join("ca.pem");
    let relay = pki.relay("relay-a");
    let (_, server) = handshake(&agent, &relay, "relay-a", "agent-a").await;
    assert!(server.is_err(), "{server:?}");
}
