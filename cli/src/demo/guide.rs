//! What the demo prints for the user to paste: the caller's environment, AWS CLI and boto3
//! lines, `xpart` lines against the running daemons, the admin URLs, how to run the daemons by
//! hand, and the self-probe's result. Every command is one line, with values shell-quoted.

use std::path::PathBuf;

use serde_json::json;

use super::material::{Material, Ports, ECHO_MODEL, PRINCIPAL, REGION};
use crate::probe::ProbeOutcome;

/// Messages in the shape the AWS CLI's `--messages` and boto3's `messages=` take.
const CLI_MESSAGES: &str = r#"[{"role":"user","content":[{"text":"hello"}]}]"#;
const PY_MESSAGES: &str = r#"[{"role": "user", "content": [{"text": "hello"}]}]"#;

/// The caller-side view of a running demo.
pub struct Guide {
    dir: PathBuf,
    env: Vec<(&'static str, String)>,
    aws_converse: String,
    boto3_converse: String,
    boto3_converse_stream: String,
    openai_chat: String,
    xpart_probe: String,
    xpart_status: String,
    agent_admin: String,
    relay_admin: String,
    run_relay: String,
    run_agent: String,
}

/// The URL callers put in `AWS_ENDPOINT_URL_BEDROCK_RUNTIME`.
pub fn endpoint(ports: &Ports) -> String {
    format!("https://localhost:{}", ports.front)
}

impl Guide {
    pub fn new(material: &Material, ports: &Ports) -> Guide {
        let env = vec![
            ("AWS_ENDPOINT_URL_BEDROCK_RUNTIME", endpoint(ports)),
            // The control plane's model-discovery reads (`aws bedrock list-foundation-models`)
            // go to the same front, which tells them from the runtime by their path.
            ("AWS_ENDPOINT_URL_BEDROCK", endpoint(ports)),
            ("AWS_CA_BUNDLE", material.ca_bundle.display().to_string()),
            // The JavaScript SDK ignores AWS_CA_BUNDLE; Node.js adds this file to its own
            // roots when the process starts.
            (
                "NODE_EXTRA_CA_CERTS",
                material.ca_bundle.display().to_string(),
            ),
            ("AWS_BEARER_TOKEN_BEDROCK", material.token.clone()),
            ("AWS_REGION", REGION.to_string()),
            // boto3 and the AWS CLI read only this one; the other SDKs read AWS_REGION.
            ("AWS_DEFAULT_REGION", REGION.to_string()),
            // The OpenAI SDKs: the agent serves the OpenAI API under /v1 on the same front,
            // with the same token as the API key.
            ("OPENAI_BASE_URL", format!("{}/v1", endpoint(ports))),
            ("OPENAI_API_KEY", material.token.clone()),
            // The OpenAI Python SDK (httpx) trusts this file instead of its own CA list;
            // Node.js's `openai` package reads NODE_EXTRA_CA_CERTS above.
            ("SSL_CERT_FILE", material.ca_bundle.display().to_string()),
        ];
        let xpart = shell_quote(&own_executable().display().to_string());
        let agent_admin = format!("http://127.0.0.1:{}", ports.agent_admin);
        let relay_admin = format!("http://127.0.0.1:{}", ports.relay_admin);
        Guide {
            dir: material.dir.clone(),
            env,
            aws_converse: format!(
                "aws bedrock-runtime converse --model-id {ECHO_MODEL} --messages {}",
                shell_quote(CLI_MESSAGES)
            ),
            boto3_converse: python_one_liner(&format!(
                r#"import boto3; r = boto3.client("bedrock-runtime").converse(modelId="{ECHO_MODEL}", messages={PY_MESSAGES}); print(r["output"]["message"]["content"][0]["text"])"#
            )),
            boto3_converse_stream: python_one_liner(&format!(
                r#"import boto3; r = boto3.client("bedrock-runtime").converse_stream(modelId="{ECHO_MODEL}", messages={PY_MESSAGES}); print("".join(e["contentBlockDelta"]["delta"]["text"] for e in r["stream"] if "contentBlockDelta" in e))"#
            )),
            openai_chat: python_one_liner(&format!(
                r#"from openai import OpenAI; r = OpenAI().chat.completions.create(model="{ECHO_MODEL}", messages=[{{"role": "user", "content": "hello"}}]); print(r.choices[0].message.content)"#
            )),
            // `localhost` may resolve to ::1 first, where the front does not listen.
            xpart_probe: format!(
                "{xpart} probe --endpoint {} --connect 127.0.0.1:{}",
                endpoint(ports),
                ports.front
            ),
            xpart_status: format!("{xpart} status --agent {agent_admin} --relay {relay_admin}"),
            agent_admin,
            relay_admin,
            run_relay: format!(
                "{} --config {}",
                daemon_command("xpart-relay"),
                shell_quote(&material.relay_config.display().to_string())
            ),
            run_agent: format!(
                "{} --config {}",
                daemon_command("xpart-agent"),
                shell_quote(&material.agent_config.display().to_string())
            ),
        }
    }

    /// `caller.env`: the environment as `export` lines, for `source`.
    pub fn env_file(&self) -> String {
        let mut text = String::from(
            "# Written by `xpart demo`: the caller's environment (holds the bearer token).\n",
        );
        for line in self.export_lines() {
            text.push_str(&line);
            text.push('\n');
        }
        text
    }

    pub fn print(&self) {
        let dir = self.dir.display();
        println!("xpart demo: an agent and a relay joined by WireGuard (userspace) on 127.0.0.1;");
        println!(
            "the relay answers the echo model {ECHO_MODEL} itself, so nothing leaves this machine."
        );
        println!();
        println!("Files in {dir}:");
        println!("  agent.toml, relay.toml     the configurations running now");
        println!("  agent.key, relay.key       WireGuard private keys (mode 600)");
        println!("  ca/ca.pem, ca/ca.key       the private CA callers trust through AWS_CA_BUNDLE (NODE_EXTRA_CA_CERTS for Node.js)");
        println!("  front.pem, front.key       the agent's certificate: localhost, 127.0.0.1, bedrock-runtime.{REGION}.amazonaws.com");
        println!("  caller.env                 the environment below (mode 600: it holds the token of principal {PRINCIPAL})");
        println!("  agent-audit.jsonl, relay-audit.jsonl   one line per request");
        println!();
        println!(
            "Caller environment (paste into another shell, or: source {}):",
            shell_quote(&self.dir.join("caller.env").display().to_string())
        );
        for line in self.export_lines() {
            println!("{line}");
        }
        let Guide {
            aws_converse,
            boto3_converse,
            boto3_converse_stream,
            openai_chat,
            xpart_probe,
            xpart_status,
            agent_admin,
            relay_admin,
            run_relay,
            run_agent,
            ..
        } = self;
        print!(
            "
AWS CLI:
{aws_converse}

boto3 (1.39 or later sends AWS_BEARER_TOKEN_BEDROCK as a bearer token), Converse and ConverseStream:
{boto3_converse}
{boto3_converse_stream}

OpenAI Python SDK (pip install openai; reads OPENAI_BASE_URL, OPENAI_API_KEY and SSL_CERT_FILE):
{openai_chat}

xpart (probe reads AWS_CA_BUNDLE and AWS_BEARER_TOKEN_BEDROCK):
{xpart_probe}
{xpart_status}

Admin:
  agent  {agent_admin}/metrics  {agent_admin}/status
  relay  {relay_admin}/metrics  {relay_admin}/status

Status pages (open in a browser; they refresh themselves):
  agent  {agent_admin}/
  relay  {relay_admin}/

The same daemons by hand, after stopping the demo (two shells):
  {run_relay}
  {run_agent}

"
        );
    }

    pub fn to_json(&self, outcome: &ProbeOutcome, echoed: bool) -> serde_json::Value {
        let env: serde_json::Map<String, serde_json::Value> = self
            .env
            .iter()
            .map(|(name, value)| (name.to_string(), json!(value)))
            .collect();
        json!({
            "dir": self.dir,
            "env": env,
            "commands": {
                "aws_converse": self.aws_converse,
                "boto3_converse": self.boto3_converse,
                "boto3_converse_stream": self.boto3_converse_stream,
                "openai_chat": self.openai_chat,
                "xpart_probe": self.xpart_probe,
                "xpart_status": self.xpart_status,
                "run_relay": self.run_relay,
                "run_agent": self.run_agent,
            },
            "admin": { "agent": self.agent_admin, "relay": self.relay_admin },
            "status_pages": {
                "agent": format!("{}/", self.agent_admin),
                "relay": format!("{}/", self.relay_admin),
            },
            "self_probe": { "echoed": echoed, "outcome": outcome },
        })
    }

    fn export_lines(&self) -> Vec<String> {
        self.env
            .iter()
            .map(|(name, value)| format!("export {name}={}", shell_quote(value)))
            .collect()
    }
}

pub fn print_probe(outcome: &ProbeOutcome, echoed: bool) {
    let t = &outcome.timings;
    let phases = format!(
        "connect {} | tls {} | first byte {} ms",
        ms(t.connect_ms),
        ms(t.tls_ms),
        ms(t.first_byte_ms)
    );
    if echoed {
        println!(
            "Self-probe: ok, {ECHO_MODEL} replied {:?} through agent, tunnel and relay in {:.1} ms ({phases})",
            outcome.reply.as_deref().unwrap_or_default(),
            t.total_ms
        );
    } else if outcome.verdict.ok {
        println!(
            "Self-probe: FAILED, {ECHO_MODEL} answered {:?}, not the message sent",
            outcome.reply.as_deref().unwrap_or_default()
        );
    } else {
        let what = outcome.verdict.failure();
        println!(
            "Self-probe: FAILED, {what}: {}",
            outcome.verdict.message.as_deref().unwrap_or_default()
        );
    }
    println!();
}

fn ms(value: Option<f64>) -> String {
    value.map_or_else(|| "-".to_string(), |ms| format!("{ms:.1}"))
}

fn python_one_liner(code: &str) -> String {
    format!("python3 -c {}", shell_quote(code))
}

/// This `xpart` by absolute path: after `cargo run` it is not on PATH.
fn own_executable() -> PathBuf {
    std::env::current_exe().unwrap_or_else(|_| PathBuf::from("xpart"))
}

/// The daemon binary next to this `xpart` when it has been built, else the cargo command that
/// builds and runs it (from the repository).
fn daemon_command(name: &str) -> String {
    let sibling = own_executable().parent().map(|dir| dir.join(name));
    match sibling {
        Some(path) if path.is_file() => shell_quote(&path.display().to_string()),
        _ => format!("cargo run -p {name} --"),
    }
}

/// POSIX shell quoting: bare when every character is safe, otherwise single quotes (with each
/// `'` written as `'\''`).
fn shell_quote(value: &str) -> String {
    let safe = !value.is_empty()
        && value
            .chars()
            .all(|c| c.is_ascii_alphanumeric() || "-_./:=@%+,".contains(c));
    if safe {
        return value.to_string();
    }
    format!("'{}'", value.replace('\'', r"'\''"))
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn shell_quote_leaves_plain_words_and_quotes_the_rest() {
        assert_eq!(
            shell_quote("/tmp/xpart-demo-1a2b/ca/ca.pem"),
            "/tmp/xpart-demo-1a2b/ca/ca.pem"
        );
        assert_eq!(shell_quote("a b"), "'a b'");
        assert_eq!(shell_quote("it's"), r"'it'\''s'");
        assert_eq!(shell_quote(""), "''");
        assert_eq!(shell_quote("$HOME"), "'$HOME'");
    }
}
