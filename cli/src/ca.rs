//! `xpart ca`: the private CA that callers trust through `AWS_CA_BUNDLE`, and the leaf
//! certificate the agent's TLS front presents for the Bedrock names and its own addresses.

use std::net::IpAddr;
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::Subcommand;
use rcgen::{
    BasicConstraints, CertificateParams, DistinguishedName, DnType, ExtendedKeyUsagePurpose, IsCa,
    Issuer, KeyPair, KeyUsagePurpose, SanType,
};
use serde::Serialize;
use time::{Duration, OffsetDateTime};

use crate::{files, Error};

const CA_CERT_FILE: &str = "ca.pem";
const CA_KEY_FILE: &str = "ca.key";
/// Backdating absorbs clock skew between the machine issuing and the callers verifying.
const BACKDATE: Duration = Duration::hours(1);

#[derive(Debug, Subcommand)]
pub enum CaCommand {
    /// Create a private CA: DIR/ca.pem (give it to callers) and DIR/ca.key (0600, keep it safe).
    #[command(after_help = "\
Examples:
  xpart ca init --dir /etc/xpart/ca
  xpart ca init --dir ca --name 'Example Corp xpart CA' --days 3650")]
    Init {
        /// Directory for ca.pem and ca.key (created if missing).
        #[arg(long, default_value = ".")]
        dir: PathBuf,
        /// The CA's common name.
        #[arg(long, default_value = "xpart private CA")]
        name: String,
        /// Validity in days.
        #[arg(long, default_value_t = 3650)]
        days: i64,
        /// Replace an existing CA (certificates it issued stop verifying).
        #[arg(long)]
        force: bool,
    },
    /// Issue the agent's TLS certificate: every Bedrock name an SDK may dial in the given regions
    /// and the agent's IPs as SANs.
    #[command(after_help = "\
Examples:
  xpart ca issue --ca-dir ca --region us-east-1 --ip 10.0.1.10 --out front
      -> front.pem (certificate + CA chain) and front.key (0600) for agent.toml [front]
  xpart ca issue --ca-dir ca --name bedrock-runtime.us-west-2.amazonaws.com --name localhost --ip 127.0.0.1")]
    Issue {
        /// Directory holding ca.pem and ca.key from `xpart ca init`.
        #[arg(long, default_value = ".")]
        ca_dir: PathBuf,
        /// Bedrock region the agent answers for; adds bedrock-runtime, bedrock,
        /// bedrock-runtime-fips and bedrock-fips .REGION.amazonaws.com (repeatable).
        #[arg(long = "region", value_name = "REGION")]
        regions: Vec<String>,
        /// Extra DNS name (repeatable).
        #[arg(long = "name", value_name = "DNS_NAME")]
        names: Vec<String>,
        /// Agent address callers may dial directly (repeatable).
        #[arg(long = "ip", value_name = "ADDRESS")]
        ips: Vec<IpAddr>,
        /// Instead of the front's certificate: the inner-TLS certificate of the relay named
        /// NAME in the agents' [[relay]] tables (NAME.relay.xpart, server authentication).
        #[arg(long, value_name = "NAME", conflicts_with_all = ["regions", "names", "ips", "agent"])]
        relay: Option<String>,
        /// Instead of the front's certificate: the inner-TLS certificate of the agent named
        /// NAME in the relays' [[agent]] tables (NAME.agent.xpart, client authentication).
        #[arg(long, value_name = "NAME", conflicts_with_all = ["regions", "names", "ips"])]
        agent: Option<String>,
        /// Output prefix: writes PREFIX.pem and PREFIX.key. Default "front", or
        /// "relay-NAME" / "agent-NAME" with --relay / --agent.
        #[arg(long)]
        out: Option<PathBuf>,
        /// Validity in days (browsers cap at 398; SDKs do not).
        #[arg(long, default_value_t = 825)]
        days: i64,
        /// Replace existing output files.
        #[arg(long)]
        force: bool,
    },
}

#[derive(Debug, Serialize)]
pub(crate) struct InitReport {
    ca_cert: PathBuf,
    ca_key: PathBuf,
    not_after: String,
}

#[derive(Debug, Serialize)]
pub(crate) struct IssueReport {
    cert: PathBuf,
    key: PathBuf,
    dns_names: Vec<String>,
    ip_addresses: Vec<IpAddr>,
    not_after: String,
    ca_bundle: PathBuf,
}

pub fn run(command: CaCommand, json: bool) -> Result<ExitCode, Error> {
    match command {
        CaCommand::Init {
            dir,
            name,
            days,
            force,
        } => {
            let report = init(&dir, &name, days, force)?;
            print_init(&report, json);
        }
        CaCommand::Issue {
            ca_dir,
            regions,
            names,
            ips,
            relay,
            agent,
            out,
            days,
            force,
        } => {
            if let Some(peer) = inner_tls_peer(relay, agent)? {
                let out = out.unwrap_or_else(|| PathBuf::from(peer.default_out()));
                let report = issue(&ca_dir, Leaf::inner_tls(&peer), &out, days, force)?;
                print_inner_tls(&report, &peer, json);
                return Ok(ExitCode::SUCCESS);
            }
            let out = out.unwrap_or_else(|| PathBuf::from("front"));
            let dns_names = leaf_dns_names(&regions, &names)?;
            let report = issue(&ca_dir, Leaf::front(dns_names, ips), &out, days, force)?;
            print_issue(&report, json);
        }
    }
    Ok(ExitCode::SUCCESS)
}

pub(crate) fn init(dir: &Path, name: &str, days: i64, force: bool) -> Result<InitReport, Error> {
    check_days(days)?;
    let cert_path = dir.join(CA_CERT_FILE);
    let key_path = dir.join(CA_KEY_FILE);
    files::refuse_existing(&[&cert_path, &key_path], force)?;
    std::fs::create_dir_all(dir)
        .map_err(|err| Error::file(dir, format!("cannot create directory: {err}")))?;

    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::default();
    params.distinguished_name = distinguished_name(name);
    params.is_ca = IsCa::Ca(BasicConstraints::Constrained(0));
    params.key_usages = vec![
        KeyUsagePurpose::KeyCertSign,
        KeyUsagePurpose::CrlSign,
        KeyUsagePurpose::DigitalSignature,
    ];
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(days);
    let key = KeyPair::generate().map_err(certificate_error)?;
    let cert = params.self_signed(&key).map_err(certificate_error)?;

    files::write_secret(&key_path, &key.serialize_pem(), force)?;
    files::write_public(&cert_path, &cert.pem(), force)?;
    Ok(InitReport {
        ca_cert: cert_path,
        ca_key: key_path,
        not_after: params.not_after.date().to_string(),
    })
}

/// The Bedrock endpoint prefixes an AWS SDK dials: the runtime and the control plane, each in
/// its FIPS form too (`AWS_USE_FIPS_ENDPOINT=true`), per the SDKs' endpoint rulesets.
pub const BEDROCK_ENDPOINT_PREFIXES: [&str; 4] = [
    "bedrock-runtime",
    "bedrock",
    "bedrock-runtime-fips",
    "bedrock-fips",
];

/// Every name a caller's SDK may dial for Bedrock in `region`.
pub fn bedrock_names(region: &str) -> impl Iterator<Item = String> + '_ {
    BEDROCK_ENDPOINT_PREFIXES
        .iter()
        .map(move |prefix| format!("{prefix}.{region}.amazonaws.com"))
}

fn leaf_dns_names(regions: &[String], names: &[String]) -> Result<Vec<String>, Error> {
    let mut dns_names = Vec::new();
    for region in regions {
        let valid = !region.is_empty()
            && region
                .chars()
                .all(|c| c.is_ascii_lowercase() || c.is_ascii_digit() || c == '-');
        if !valid {
            return Err(Error::Usage(format!(
                "--region {region:?} is not a region name like us-east-1 or us-gov-west-1"
            )));
        }
        dns_names.extend(bedrock_names(region));
    }
    dns_names.extend(names.iter().cloned());
    if dns_names.is_empty() {
        return Err(Error::Usage(
            "name the certificate: give --region REGION (for the Bedrock names of REGION) or --name DNS_NAME".into(),
        ));
    }
    let mut seen = std::collections::HashSet::new();
    dns_names.retain(|name| seen.insert(name.clone()));
    Ok(dns_names)
}

/// What a leaf certificate names and what it may be used for.
pub(crate) struct Leaf {
    dns_names: Vec<String>,
    ips: Vec<IpAddr>,
    usage: ExtendedKeyUsagePurpose,
}

impl Leaf {
    /// The agent front's server certificate, for the names and addresses callers dial.
    pub(crate) fn front(dns_names: Vec<String>, ips: Vec<IpAddr>) -> Leaf {
        Leaf {
            dns_names,
            ips,
            usage: ExtendedKeyUsagePurpose::ServerAuth,
        }
    }

    /// The inner-TLS certificate of one relay or agent, from the same CA as the front's.
    fn inner_tls(peer: &InnerTlsPeer) -> Leaf {
        Leaf {
            dns_names: vec![peer.dns_name()],
            ips: Vec::new(),
            usage: peer.usage(),
        }
    }
}

/// Which side of the inner TLS a certificate is for, and the peer's name.
#[derive(Debug, Clone, PartialEq, Eq)]
pub(crate) enum InnerTlsPeer {
    Relay(String),
    Agent(String),
}

impl InnerTlsPeer {
    fn name(&self) -> &str {
        match self {
            InnerTlsPeer::Relay(name) => name,
            InnerTlsPeer::Agent(name) => name,
        }
    }

    fn dns_name(&self) -> String {
        match self {
            InnerTlsPeer::Relay(name) => xpart_daemon::inner_tls::relay_name(name),
            InnerTlsPeer::Agent(name) => xpart_daemon::inner_tls::agent_name(name),
        }
    }

    fn usage(&self) -> ExtendedKeyUsagePurpose {
        match self {
            InnerTlsPeer::Relay(_) => ExtendedKeyUsagePurpose::ServerAuth,
            InnerTlsPeer::Agent(_) => ExtendedKeyUsagePurpose::ClientAuth,
        }
    }

    fn default_out(&self) -> String {
        match self {
            InnerTlsPeer::Relay(name) => format!("relay-{name}"),
            InnerTlsPeer::Agent(name) => format!("agent-{name}"),
        }
    }
}

fn inner_tls_peer(
    relay: Option<String>,
    agent: Option<String>,
) -> Result<Option<InnerTlsPeer>, Error> {
    let (peer, flag) = match (relay, agent) {
        (Some(name), _) => (InnerTlsPeer::Relay(name), "--relay"),
        (None, Some(name)) => (InnerTlsPeer::Agent(name), "--agent"),
        (None, None) => return Ok(None),
    };
    if !xpart_daemon::inner_tls::is_valid_peer_name(peer.name()) {
        return Err(Error::Usage(format!(
            "{flag} {:?}: the name must be the peer table's name, one DNS label (lowercase letters, digits and '-', at most 63)",
            peer.name()
        )));
    }
    Ok(Some(peer))
}

pub(crate) fn issue(
    ca_dir: &Path,
    leaf: Leaf,
    out: &Path,
    days: i64,
    force: bool,
) -> Result<IssueReport, Error> {
    let Leaf {
        dns_names,
        ips,
        usage,
    } = leaf;
    check_days(days)?;
    let ca_cert_path = ca_dir.join(CA_CERT_FILE);
    let ca_key_path = ca_dir.join(CA_KEY_FILE);
    let cert_path = PathBuf::from(format!("{}.pem", out.display()));
    let key_path = PathBuf::from(format!("{}.key", out.display()));
    files::refuse_existing(&[&cert_path, &key_path], force)?;

    let ca_cert_pem = files::read_text(&ca_cert_path, "the CA certificate (run `xpart ca init`)")?;
    let ca_key_pem = files::read_secret(&ca_key_path, "the CA private key")?;
    let ca_key = KeyPair::from_pem(&ca_key_pem)
        .map_err(|err| Error::file(&ca_key_path, format!("not a PEM private key: {err}")))?;
    check_key_matches_cert(&ca_cert_pem, &ca_key, &ca_cert_path, &ca_key_path)?;
    let issuer = Issuer::from_ca_cert_pem(&ca_cert_pem, ca_key)
        .map_err(|err| Error::file(&ca_cert_path, format!("not a CA certificate: {err}")))?;

    let now = OffsetDateTime::now_utc();
    let mut params = CertificateParams::new(dns_names.clone())
        .map_err(|err| Error::Usage(format!("invalid DNS name: {err}")))?;
    params
        .subject_alt_names
        .extend(ips.iter().copied().map(SanType::IpAddress));
    params.distinguished_name = distinguished_name(&dns_names[0]);
    params.key_usages = vec![KeyUsagePurpose::DigitalSignature];
    params.extended_key_usages = vec![usage];
    params.use_authority_key_identifier_extension = true;
    params.not_before = now - BACKDATE;
    params.not_after = now + Duration::days(days);
    let key = KeyPair::generate().map_err(certificate_error)?;
    let cert = params.signed_by(&key, &issuer).map_err(certificate_error)?;

    files::write_secret(&key_path, &key.serialize_pem(), force)?;
    let chain = format!("{}{}", cert.pem(), ca_cert_pem);
    files::write_public(&cert_path, &chain, force)?;
    Ok(IssueReport {
        cert: cert_path,
        key: key_path,
        dns_names,
        ip_addresses: ips,
        not_after: params.not_after.date().to_string(),
        ca_bundle: ca_cert_path,
    })
}

fn check_days(days: i64) -> Result<(), Error> {
    if (1..=36500).contains(&days) {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "--days {days} is out of range (1..=36500)"
    )))
}

fn distinguished_name(common_name: &str) -> DistinguishedName {
    let mut name = DistinguishedName::new();
    name.push(DnType::OrganizationName, "xpart");
    name.push(DnType::CommonName, common_name);
    name
}

/// A CA key that does not belong to the CA certificate would produce leaves that no caller
/// can verify; catch it before writing anything.
fn check_key_matches_cert(
    cert_pem: &str,
    key: &KeyPair,
    cert_path: &Path,
    key_path: &Path,
) -> Result<(), Error> {
    let (_, pem) = x509_parser::pem::parse_x509_pem(cert_pem.as_bytes())
        .map_err(|err| Error::file(cert_path, format!("not a PEM certificate: {err}")))?;
    let cert = pem
        .parse_x509()
        .map_err(|err| Error::file(cert_path, format!("not an X.509 certificate: {err}")))?;
    if cert.public_key().subject_public_key.data.as_ref() != key.public_key_raw() {
        return Err(Error::file(
            key_path,
            format!(
                "this key does not belong to the CA certificate {}; use the ca.key written with it",
                cert_path.display()
            ),
        ));
    }
    Ok(())
}

fn certificate_error(err: rcgen::Error) -> Error {
    Error::Usage(format!("cannot build the certificate: {err}"))
}

fn print_json(report: &impl Serialize) {
    println!("{}", serde_json::to_string(report).unwrap_or_default());
}

fn print_init(report: &InitReport, json: bool) {
    if json {
        return print_json(report);
    }
    println!("CA certificate: {}", report.ca_cert.display());
    println!("CA private key: {} (mode 600; anyone holding it can impersonate the agent to your callers: keep it off the appliances)", report.ca_key.display());
    println!("Valid until:    {}", report.not_after);
    println!();
    println!("Next, issue the agent's certificate:");
    println!(
        "  xpart ca issue --ca-dir {} --region REGION --ip AGENT_IP",
        report
            .ca_cert
            .parent()
            .map(Path::display)
            .map(|d| d.to_string())
            .unwrap_or_else(|| ".".into())
    );
    print_bundle_instructions(&report.ca_cert);
}

fn print_issue(report: &IssueReport, json: bool) {
    if json {
        return print_json(report);
    }
    println!("Certificate: {} (with the CA chain)", report.cert.display());
    println!("Private key: {} (mode 600)", report.key.display());
    println!("DNS names:   {}", report.dns_names.join(", "));
    if !report.ip_addresses.is_empty() {
        let ips: Vec<String> = report
            .ip_addresses
            .iter()
            .map(ToString::to_string)
            .collect();
        println!("IP SANs:     {}", ips.join(", "));
    }
    println!("Valid until: {}", report.not_after);
    println!();
    println!("In agent.toml:");
    println!("  [front]");
    println!("  cert_file = {:?}", report.cert.display().to_string());
    println!("  key_file = {:?}", report.key.display().to_string());
    print_bundle_instructions(&report.ca_bundle);
}

fn print_inner_tls(report: &IssueReport, peer: &InnerTlsPeer, json: bool) {
    if json {
        return print_json(report);
    }
    let (file, table) = match peer {
        InnerTlsPeer::Relay(_) => ("relay.toml", "the agents' [[relay]]"),
        InnerTlsPeer::Agent(_) => ("agent.toml", "the relays' [[agent]]"),
    };
    println!("Certificate: {} (with the CA chain)", report.cert.display());
    println!("Private key: {} (mode 600)", report.key.display());
    println!("Name:        {}", report.dns_names.join(", "));
    println!("Valid until: {}", report.not_after);
    println!();
    println!(
        "In {file} ({} must be the name in {table} table):",
        peer.name()
    );
    println!("  [tunnel]");
    println!("  inner_tls = true");
    println!(
        "  inner_tls_cert_file = {:?}",
        report.cert.display().to_string()
    );
    println!(
        "  inner_tls_key_file = {:?}",
        report.key.display().to_string()
    );
    println!(
        "  inner_tls_ca_file = {:?}",
        report.ca_bundle.display().to_string()
    );
}

fn print_bundle_instructions(ca_cert: &Path) {
    println!();
    println!("On each caller, trust the CA for Bedrock calls:");
    println!(
        "  export AWS_CA_BUNDLE=/path/to/{}",
        ca_cert
            .file_name()
            .map(|n| n.to_string_lossy().to_string())
            .unwrap_or_else(|| CA_CERT_FILE.into())
    );
    println!(
        "AWS_CA_BUNDLE replaces the SDK's trust store for every AWS endpoint: if the caller also"
    );
    println!(
        "reaches other AWS services directly, give it a bundle with the system CAs and this one:"
    );
    println!(
        "  cat /etc/pki/tls/certs/ca-bundle.crt {} > xpart-bundle.pem",
        ca_cert.display()
    );
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_region_names_both_services_and_their_fips_forms() {
        let names = leaf_dns_names(&["us-east-1".into(), "us-west-2".into()], &[]).unwrap();
        assert_eq!(
            names,
            [
                "bedrock-runtime.us-east-1.amazonaws.com",
                "bedrock.us-east-1.amazonaws.com",
                "bedrock-runtime-fips.us-east-1.amazonaws.com",
                "bedrock-fips.us-east-1.amazonaws.com",
                "bedrock-runtime.us-west-2.amazonaws.com",
                "bedrock.us-west-2.amazonaws.com",
                "bedrock-runtime-fips.us-west-2.amazonaws.com",
                "bedrock-fips.us-west-2.amazonaws.com",
            ]
        );
    }

    #[test]
    fn extra_names_follow_the_region_names_once_each() {
        let names = leaf_dns_names(
            &["us-east-1".into()],
            &["localhost".into(), "bedrock.us-east-1.amazonaws.com".into()],
        )
        .unwrap();
        assert_eq!(names.len(), 5);
        assert_eq!(names[4], "localhost");
    }

    #[test]
    fn an_inner_tls_name_must_be_one_dns_label() {
        let peer = inner_tls_peer(Some("relay-a".into()), None).unwrap();
        assert_eq!(peer, Some(InnerTlsPeer::Relay("relay-a".into())));
        assert_eq!(peer.unwrap().dns_name(), "relay-a.relay.xpart");
        let err = inner_tls_peer(None, Some("Agent.A".into())).unwrap_err();
        assert!(err.to_string().contains("--agent \"Agent.A\""), "{err}");
    }

    #[test]
    fn a_region_that_is_not_a_name_is_refused() {
        let err = leaf_dns_names(&["us-east-1.amazonaws.com".into()], &[]).unwrap_err();
        assert!(err.to_string().contains("is not a region name"), "{err}");
        let err = leaf_dns_names(&[], &[]).unwrap_err();
        assert!(err.to_string().contains("--region REGION"), "{err}");
    }
}
