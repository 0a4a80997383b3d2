use std::net::IpAddr;

use x509_parser::extensions::GeneralName;
use x509_parser::pem::Pem;

use crate::support::{chmod, mode, xpart, Run, Scratch};

fn certificates(path: &std::path::Path) -> Vec<Pem> {
    let bytes = std::fs::read(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    Pem::iter_from_buffer(&bytes)
        .map(|pem| pem.unwrap_or_else(|err| panic!("{}: {err}", path.display())))
        .collect()
}

/// `xpart ca issue` with the CA `init_ca` made, writing `front.pem` and `front.key`, plus `more`.
fn issue(dir: &Scratch, more: &[&str]) -> Run {
    let (ca, out) = (dir.arg("ca"), dir.arg("front"));
    let mut args = vec![
        "ca",
        "issue",
        "--ca-dir",
        ca.as_str(),
        "--out",
        out.as_str(),
    ];
    args.extend_from_slice(more);
    xpart(&args)
}

fn init_ca(dir: &Scratch) {
    xpart(&[
        "ca",
        "init",
        "--dir",
        &dir.arg("ca"),
        "--name",
        "Test xpart CA",
    ])
    .ok();
}

#[test]
fn init_writes_a_ca_certificate_and_a_0600_key() {
    let dir = Scratch::new();
    let run = xpart(&["ca", "init", "--dir", &dir.arg("ca")]).ok();
    run.says("AWS_CA_BUNDLE");
    assert_eq!(mode(&dir.path("ca/ca.key")), 0o600);
    assert_eq!(mode(&dir.path("ca/ca.pem")), 0o644);
    let pems = certificates(&dir.path("ca/ca.pem"));
    let ca = pems[0].parse_x509().unwrap();
    assert!(ca.is_ca());
    assert_eq!(ca.subject(), ca.issuer());
    assert!(ca.subject().to_string().contains("xpart private CA"));
}

#[test]
fn issue_names_the_bedrock_endpoints_and_agent_ips_and_chains_to_the_ca() {
    let dir = Scratch::new();
    init_ca(&dir);
    let names = "--region us-east-1 --region us-west-2 --name localhost";
    let ips = "--ip 10.0.1.10 --ip 127.0.0.1 --ip ::1";
    let more: Vec<&str> = names.split(' ').chain(ips.split(' ')).collect();
    let run = issue(&dir, &more).ok();
    run.says("AWS_CA_BUNDLE");
    run.says("cert_file");
    assert_eq!(mode(&dir.path("front.key")), 0o600);

    let chain = certificates(&dir.path("front.pem"));
    assert_eq!(chain.len(), 2, "leaf followed by the CA");
    let leaf = chain[0].parse_x509().unwrap();
    let ca_pems = certificates(&dir.path("ca/ca.pem"));
    let ca = ca_pems[0].parse_x509().unwrap();
    assert_eq!(chain[1].contents, ca_pems[0].contents);
    assert_eq!(leaf.issuer(), ca.subject());
    leaf.verify_signature(Some(ca.public_key()))
        .expect("leaf signed by the CA");
    assert!(!leaf.is_ca());

    let san = leaf
        .subject_alternative_name()
        .unwrap()
        .expect("SAN extension");
    let mut dns = Vec::new();
    let mut ips = Vec::new();
    for name in &san.value.general_names {
        match name {
            GeneralName::DNSName(name) => dns.push(name.to_string()),
            GeneralName::IPAddress(bytes) => ips.push(match bytes.len() {
                4 => IpAddr::from(<[u8; 4]>::try_from(*bytes).unwrap()),
                _ => IpAddr::from(<[u8; 16]>::try_from(*bytes).unwrap()),
            }),
            other => panic!("unexpected SAN {other:?}"),
        }
    }
    let services = [
        "bedrock-runtime",
        "bedrock",
        "bedrock-runtime-fips",
        "bedrock-fips",
    ];
    let regional = ["us-east-1", "us-west-2"]
        .iter()
        .flat_map(|region| services.map(|service| format!("{service}.{region}.amazonaws.com")));
    let expected: Vec<String> = regional.chain(["localhost".to_string()]).collect();
    assert_eq!(dns, expected);
    let expected: Vec<IpAddr> = ["10.0.1.10", "127.0.0.1", "::1"]
        .iter()
        .map(|ip| ip.parse().unwrap())
        .collect();
    assert_eq!(ips, expected);
    let eku = leaf.extended_key_usage().unwrap().expect("EKU");
    assert!(eku.value.server_auth);
}

#[test]
fn issue_without_a_ca_says_to_run_init() {
    assert_issue_refused(&Scratch::new(), "xpart ca init");
}

#[test]
fn issue_refuses_a_ca_key_readable_by_others() {
    let dir = Scratch::new();
    init_ca(&dir);
    chmod(&dir.path("ca/ca.key"), 0o644);
    assert_issue_refused(&dir, "chmod 600");
}

#[test]
fn issue_refuses_a_key_from_another_ca() {
    let dir = Scratch::new();
    init_ca(&dir);
    xpart(&["ca", "init", "--dir", &dir.arg("other")]).ok();
    std::fs::copy(dir.path("other/ca.key"), dir.path("ca/ca.key")).unwrap();
    assert_issue_refused(&dir, "does not belong");
}

/// `ca issue` for us-east-1 fails, says `reason`, and writes neither file.
#[track_caller]
fn assert_issue_refused(dir: &Scratch, reason: &str) {
    issue(dir, &["--region", "us-east-1"])
        .fails_with(2)
        .complains(reason);
    assert!(!dir.path("front.pem").exists());
    assert!(!dir.path("front.key").exists());
}

#[test]
fn issue_needs_a_name_and_valid_inputs() {
    let dir = Scratch::new();
    init_ca(&dir);
    let none = issue(&dir, &[]).fails_with(2);
    none.complains("--region");
    issue(&dir, &["--region", "US East"]).fails_with(2);
    issue(&dir, &["--region", "us-east-1", "--ip", "10.0.1"]).fails_with(2);
    issue(&dir, &["--region", "us-east-1", "--days", "0"]).fails_with(2);
    assert!(!dir.path("front.pem").exists());
}

#[test]
fn ca_files_are_never_overwritten_without_force() {
    let dir = Scratch::new();
    init_ca(&dir);
    let before = std::fs::read(dir.path("ca/ca.key")).unwrap();
    let again = xpart(&["ca", "init", "--dir", &dir.arg("ca")]).fails_with(2);
    again.complains("--force");
    assert_eq!(std::fs::read(dir.path("ca/ca.key")).unwrap(), before);

    issue(&dir, &["--name", "localhost"]).ok();
    let leaf = std::fs::read(dir.path("front.pem")).unwrap();
    issue(&dir, &["--name", "localhost"]).fails_with(2);
    assert_eq!(std::fs::read(dir.path("front.pem")).unwrap(), leaf);
    issue(&dir, &["--name", "localhost", "--force"]).ok();
    assert_ne!(std::fs::read(dir.path("front.pem")).unwrap(), leaf);
}
