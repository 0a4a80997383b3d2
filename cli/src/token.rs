//! `xpart token`: bearer tokens for callers. The agent stores only the SHA-256 of each token,
//! so the token itself is shown once, here, and never written anywhere by xpart.

use std::process::ExitCode;

use base64::Engine;
use clap::Subcommand;
use rand::RngCore;
use serde::Serialize;
use sha2::{Digest, Sha256};

use crate::{files, Error};

/// Random bytes per token: 256 bits, beyond guessing at any request rate.
const TOKEN_BYTES: usize = 32;
/// Marks the string as an xpart token in logs and secret scanners.
const TOKEN_PREFIX: &str = "xpt_";
/// `max_concurrent` written for a new principal: one caller cannot hold every connection the
/// agent and the relay have, and a Lambda fleet rarely needs more at once.
pub const DEFAULT_MAX_CONCURRENT: u32 = 64;
/// Where the AMIs keep the agent's configuration.
const DEFAULT_AGENT_CONFIG: &str = "/etc/xpart/agent.toml";

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
        /// Requests this principal may have in flight at once (the agent refuses more with
        /// ThrottlingException).
        #[arg(long, default_value_t = DEFAULT_MAX_CONCURRENT)]
        max_concurrent: u32,
    },
    /// Remove a principal, found by name or by its token's SHA-256, from agent.toml; the token
    /// stops working when the agent reloads (SIGHUP; `systemctl reload xpart-agent`).
    #[command(after_help = "\
Examples:
  xpart token revoke --principal summarizer-lambda --config /etc/xpart/agent.toml
  printf %s \"$OLD_TOKEN\" | xpart token hash | xargs xpart token revoke --token-sha256

The whole [[principal]] table goes: without its token_sha256, a principal that also lists
source_cidrs would admit every caller from those ranges without a token.")]
    Revoke {
        /// The principal's name.
        #[arg(
            long,
            required_unless_present = "token_sha256",
            conflicts_with = "token_sha256"
        )]
        principal: Option<String>,
        /// The SHA-256 (hex) of the token to revoke, as `xpart token hash` prints it.
        #[arg(long, value_name = "HEX")]
        token_sha256: Option<String>,
        /// The agent configuration to edit.
        #[arg(long, value_name = "FILE", default_value = DEFAULT_AGENT_CONFIG)]
        config: std::path::PathBuf,
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
    max_concurrent: u32,
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
        TokenCommand::Revoke {
            principal,
            token_sha256,
            config,
        } => revoke(principal, token_sha256, &config, json),
    }
}

fn new_token(
    principal: String,
    models: Vec<String>,
    source_cidrs: Vec<ipnet::IpNet>,
    rps: Option<f64>,
    max_concurrent: u32,
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
        None => files::read_stdin("the token")?,
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

/// Which principal `xpart token revoke` removes.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Revoked {
    Named(String),
    Token(String),
}

fn revoke(
    principal: Option<String>,
    token_sha256: Option<String>,
    config: &std::path::Path,
    json: bool,
) -> Result<ExitCode, Error> {
    let which = match (principal, token_sha256) {
        (Some(name), None) => Revoked::Named(name),
        (None, Some(hash)) => Revoked::Token(hash.trim().to_ascii_lowercase()),
        _ => {
            return Err(Error::Usage(
                "name the principal with --principal NAME or its token with --token-sha256 HEX"
                    .into(),
            ))
        }
    };
    let io_error = |context: String| {
        move |source| Error::Io {
            context: context.clone(),
            source,
        }
    };
    let text = std::fs::read_to_string(config)
        .map_err(io_error(format!("reading {}", config.display())))?;
    let (edited, removed) = remove_principal(&text, &which)
        .map_err(|reason| Error::Usage(format!("{}: {reason}", config.display())))?;
    write_in_place(config, &edited).map_err(io_error(format!("writing {}", config.display())))?;
    if json {
        println!(
            "{}",
            serde_json::json!({ "config": config.display().to_string(), "removed": removed })
        );
    } else {
        println!(
            "Removed principal {} from {}. Reload the agent for it to take effect: systemctl reload xpart-agent (or kill -HUP the agent's pid).",
            removed.join(", "),
            config.display()
        );
    }
    Ok(ExitCode::SUCCESS)
}

/// Why `xpart token revoke` changed nothing, and what to do.
#[derive(Debug, thiserror::Error)]
enum RevokeError {
    #[error("not valid TOML ({0}); fix it before revoking")]
    NotToml(toml_edit::TomlError),
    #[error("has no [[principal]] tables")]
    NoPrincipals,
    #[error("no [[principal]] is named {0:?}; `xpart config check` lists them")]
    NoSuchName(String),
    #[error("no [[principal]] has that token_sha256; check it with `xpart token hash`")]
    NoSuchToken,
}

/// `text` without the `[[principal]]` tables `which` names, keeping everything else as written
/// (comments, order, formatting); also the names removed.
fn remove_principal(text: &str, which: &Revoked) -> Result<(String, Vec<String>), RevokeError> {
    let mut document: toml_edit::DocumentMut = text.parse().map_err(RevokeError::NotToml)?;
    let Some(tables) = document
        .get_mut("principal")
        .and_then(|item| item.as_array_of_tables_mut())
    else {
        return Err(RevokeError::NoPrincipals);
    };
    let field = |table: &toml_edit::Table, key: &str| {
        table.get(key).and_then(|v| v.as_str()).map(str::to_owned)
    };
    let mut removed = Vec::new();
    let mut index = 0;
    while index < tables.len() {
        let Some(table) = tables.get(index) else {
            break;
        };
        let matches = match which {
            Revoked::Named(name) => field(table, "name").as_deref() == Some(name.as_str()),
            Revoked::Token(hash) => {
                field(table, "token_sha256").is_some_and(|have| have.eq_ignore_ascii_case(hash))
            }
        };
        if matches {
            removed.push(field(table, "name").unwrap_or_default());
            tables.remove(index);
        } else {
            index += 1;
        }
    }
    if removed.is_empty() {
        return Err(match which {
            Revoked::Named(name) => RevokeError::NoSuchName(name.clone()),
            Revoked::Token(_) => RevokeError::NoSuchToken,
        });
    }
    if tables.is_empty() {
        document.remove("principal");
    }
    Ok((document.to_string(), removed))
}

/// Replace `path`'s contents through a file beside it and a rename, keeping its permissions,
/// so the agent never reads half a file.
fn write_in_place(path: &std::path::Path, text: &str) -> std::io::Result<()> {
    let permissions = std::fs::metadata(path)?.permissions();
    let mut staging = path.as_os_str().to_owned();
    staging.push(".xpart-new");
    let staging = std::path::PathBuf::from(staging);
    std::fs::write(&staging, text)?;
    std::fs::set_permissions(&staging, permissions)?;
    std::fs::rename(&staging, path)
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

    const AGENT_TOML: &str = r#"# the agent
[front]
listen = "0.0.0.0:443"

# the summarizer, owned by team A
[[principal]]
name = "summarizer"
token_sha256 = "AA11"
source_cidrs = ["10.0.0.0/8"]
models = ["*"]

[[principal]]
name = "batch"   # nightly jobs
token_sha256 = "bb22"
models = ["anthropic.*"]
"#;

    #[test]
    fn revoking_by_name_removes_that_principal_and_keeps_the_rest_as_written() {
        let (edited, removed) =
            remove_principal(AGENT_TOML, &Revoked::Named("summarizer".into())).expect("found");
        assert_eq!(removed, ["summarizer"]);
        assert!(!edited.contains("summarizer"));
        assert!(
            !edited.contains("10.0.0.0/8"),
            "no token-less CIDR principal is left"
        );
        assert!(edited.starts_with("# the agent\n[front]\nlisten = \"0.0.0.0:443\"\n"));
        assert!(edited.contains("name = \"batch\"   # nightly jobs"));
    }

    #[test]
    fn revoking_by_token_hash_ignores_case_and_unknown_ones_are_refused() {
        let (edited, removed) =
            remove_principal(AGENT_TOML, &Revoked::Token("aa11".into())).expect("found");
        assert_eq!(removed, ["summarizer"]);
        assert!(edited.contains("bb22"));
        let (edited, _) = remove_principal(&edited, &Revoked::Token("bb22".into())).expect("found");
        assert!(!edited.contains("[[principal]]"));
        assert!(remove_principal(AGENT_TOML, &Revoked::Named("nobody".into())).is_err());
        assert!(remove_principal(AGENT_TOML, &Revoked::Token("ffff".into())).is_err());
    }

    #[test]
    fn principal_names_that_would_break_toml_or_logs_are_refused() {
        assert!(validate_principal_name("summarizer-lambda").is_ok());
        assert!(validate_principal_name("").is_err());
        assert!(validate_principal_name("a\"b").is_err());
        assert!(validate_principal_name("new\nline").is_err());
    }
}
