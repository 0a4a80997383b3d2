//! `xpart token`: bearer tokens for callers. The agent stores only the SHA-256 of each token,
//! so the token itself is shown once, here, and never written anywhere by xpart.

use std::io::Read;
use std::process::ExitCode;

use base64::Engine;
use clap::Subcommand;
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::Error;

/// Random bytes per token: 256 bits, beyond guessing at any request rate.
const TOKEN_BYTES: usize = 32;
/// Marks the string as an xpart token in logs and secret scanners.
const TOKEN_PREFIX: &str = "xpt_";

#[derive(Debug, Subcommand)]
pub enum TokenCommand {
    /// Make a random token for a principal; print it once with its agent.toml snippet.
    #[command(
        alias = "create",
        after_help = "\
Examples:
  xpart token new --principal summarizer-lambda
  xpart token new --principal batch --model 'anthropic.claude-*' --source-cidr 10.0.16.0/20 --rps 20

The caller sets the token as AWS_BEARER_TOKEN_BEDROCK (boto3 >= 1.39, Java and Rust SDKs
send it as `Authorization: Bearer`); agent.toml gets only its SHA-256."
    )]
    New {
        /// The principal's name, as it appears in audit lines.
        #[arg(long)]
        principal: String,
        /// Model patterns this principal may call (repeatable; default "*").
        #[arg(long = "model", value_name = "PATTERN")]
        models: Vec<String>,
        /// Caller source ranges the token is valid from (repeatable).
        #[arg(long = "source-cidr", value_name = "CIDR")]
        source_cidrs: Vec<ipnet::IpNet>,
        /// Request rate limit for the snippet.
        #[arg(long)]
        rps: Option<f64>,
        /// Concurrent request limit for the snippet.
        #[arg(long)]
        max_concurrent: Option<u32>,
    },
    /// Print the SHA-256 (hex) of a token, read from the argument or stdin.
    #[command(after_help = "\
Examples:
  printf %s \"$AWS_BEARER_TOKEN_BEDROCK\" | xpart token hash   # keeps the token out of shell history")]
    Hash {
        /// The token; read from stdin when absent.
        token: Option<String>,
    },
}

#[derive(Debug, Serialize)]
struct PrincipalSnippet {
    principal: Vec<PrincipalEntry>,
}

#[derive(Debug, Serialize)]
struct PrincipalEntry {
    name: String,
    token_sha256: String,
    models: Vec<String>,
    #[serde(skip_serializing_if = "Vec::is_empty")]
    source_cidrs: Vec<String>,
    #[serde(skip_serializing_if = "Option::is_none")]
    requests_per_second: Option<f64>,
    #[serde(skip_serializing_if = "Option::is_none")]
    max_concurrent: Option<u32>,
}

pub fn run(command: TokenCommand, json: bool) -> Result<ExitCode, Error> {
    match command {
        TokenCommand::New {
            principal,
            models,
            source_cidrs,
            rps,
            max_concurrent,
        } => new_token(principal, models, source_cidrs, rps, max_concurrent, json),
        TokenCommand::Hash { token } => hash_token(token, json),
    }
}

fn new_token(
    principal: String,
    models: Vec<String>,
    source_cidrs: Vec<ipnet::IpNet>,
    rps: Option<f64>,
    max_concurrent: Option<u32>,
    json: bool,
) -> Result<ExitCode, Error> {
    validate_principal_name(&principal)?;
    let token = generate_token();
    let token_sha256 = sha256_hex(&token);
    let entry = PrincipalEntry {
        name: principal.clone(),
        token_sha256: token_sha256.clone(),
        models: if models.is_empty() {
            vec!["*".into()]
        } else {
            models
        },
        source_cidrs: source_cidrs.iter().map(ToString::to_string).collect(),
        requests_per_second: rps,
        max_concurrent,
    };
    let snippet = toml::to_string(&PrincipalSnippet {
        principal: vec![entry],
    })
    .map_err(|err| Error::Usage(format!("cannot render the snippet: {err}")))?;
    if json {
        let report = serde_json::json!({
            "principal": principal,
            "token": token,
            "token_sha256": token_sha256,
            "snippet": snippet,
        });
        println!("{report}");
        return Ok(ExitCode::SUCCESS);
    }
    println!("Token for principal {principal:?} (shown once; xpart keeps no copy):");
    println!();
    println!("  {token}");
    println!();
    println!("Give it to the caller as AWS_BEARER_TOKEN_BEDROCK. Add this to agent.toml:");
    println!();
    print!("{snippet}");
    Ok(ExitCode::SUCCESS)
}

fn hash_token(token: Option<String>, json: bool) -> Result<ExitCode, Error> {
    let token = match token {
        Some(token) => token,
        None => {
            let mut text = String::new();
            std::io::stdin()
                .read_to_string(&mut text)
                .map_err(|err| Error::Io {
                    context: "reading the token from stdin".into(),
                    source: err,
                })?;
            text.trim().to_string()
        }
    };
    if token.is_empty() {
        return Err(Error::Usage(
            "empty token; pass it as an argument or on stdin".into(),
        ));
    }
    let digest = sha256_hex(&token);
    if json {
        println!("{}", serde_json::json!({ "token_sha256": digest }));
    } else {
        println!("{digest}");
    }
    Ok(ExitCode::SUCCESS)
}

/// Names end up in audit lines and metrics labels, so keep them to a plain identifier alphabet.
fn validate_principal_name(name: &str) -> Result<(), Error> {
    let valid = !name.is_empty()
        && name.len() <= 64
        && name
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if valid {
        return Ok(());
    }
    Err(Error::Usage(format!(
        "principal name {name:?} must be 1-64 characters of letters, digits, '-', '_' or '.'"
    )))
}

pub(crate) fn generate_token() -> String {
    let mut bytes = [0u8; TOKEN_BYTES];
    rand::rngs::OsRng.fill_bytes(&mut bytes);
    format!(
        "{TOKEN_PREFIX}{}",
        base64::engine::general_purpose::URL_SAFE_NO_PAD.encode(bytes)
    )
}

pub fn sha256_hex(token: &str) -> String {
    Sha256::digest(token.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn sha256_matches_the_published_test_vector() {
        assert_eq!(
            sha256_hex("abc"),
            "ba7816bf8f01cfea414140de5dae2223b00361a396177a9cb410ff61f20015ad"
        );
    }

    #[test]
    fn tokens_are_prefixed_random_and_url_safe() {
        let first = generate_token();
        let second = generate_token();
        assert_ne!(first, second);
        assert!(first.starts_with(TOKEN_PREFIX));
        assert_eq!(first.len(), TOKEN_PREFIX.len() + 43);
        assert!(first[TOKEN_PREFIX.len()..]
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '-' || c == '_'));
    }

    #[test]
    fn principal_names_that_would_break_toml_or_logs_are_refused() {
        assert!(validate_principal_name("summarizer-lambda").is_ok());
        assert!(validate_principal_name("").is_err());
        assert!(validate_principal_name("a\"b").is_err());
        assert!(validate_principal_name("new\nline").is_err());
    }
}
