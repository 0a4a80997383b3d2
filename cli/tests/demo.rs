//! `xpart demo --once` as a user runs it: the self-probe crosses the agent, the userspace
//! WireGuard tunnel and the relay on loopback, and the files it leaves behind are the ones that
//! ran (keys 0600, the token's hash in agent.toml, the peers' keys crossed over); and a demo
//! left running, checked with `xpart status` and stopped with Ctrl-C. Every run uses free
//! ports (`0`) so parallel test runs cannot collide.

use std::io::{BufRead, BufReader};
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant};

use sha2::{Digest, Sha256};

#[path = "commands/support.rs"]
mod support;

use support::{run, xpart, Run, Scratch};

const FREE_PORTS: [&str; 6] = ["--front-port", "0", "--wg-port", "0", "--admin-port", "0"];

#[test]
fn once_gets_the_echo_back_through_agent_tunnel_and_relay() {
    let (_scratch, dir, run) = demo_once(&[]);
    assert!(
        run.stdout.contains(
            "Self-probe: ok, xpart.echo replied \"hello from xpart demo\" through agent, tunnel and relay"
        ),
        "{run:?}"
    );
    let audit = std::fs::read_to_string(dir.join("agent-audit.jsonl")).expect("agent audit log");
    let line: serde_json::Value =
        serde_json::from_str(audit.lines().next().expect("one audit line")).expect("JSON line");
    assert_eq!(line["principal"], "demo-caller");
    assert_eq!(line["operation"], "Converse");
    assert_eq!(line["model"], "xpart.echo");
    assert_eq!(line["status"], 200);
    let relay_audit =
        std::fs::read_to_string(dir.join("relay-audit.jsonl")).expect("relay audit log");
    assert_eq!(relay_audit.lines().count(), 1, "{relay_audit}");
}

#[test]
fn the_printed_environment_is_the_one_written_to_caller_env_and_agent_toml() {
    let (_scratch, dir, run) = demo_once(&[]);
    let caller_env = std::fs::read_to_string(dir.join("caller.env")).expect("caller.env");
    let written: Vec<&str> = caller_env
        .lines()
        .filter(|l| l.starts_with("export "))
        .collect();
    let printed: Vec<&str> = run
        .stdout
        .lines()
        .filter(|l| l.starts_with("export "))
        .collect();
    assert_eq!(written, printed);
    let env = exports(&caller_env);
    let ca_bundle = dir.canonicalize().unwrap().join("ca/ca.pem");
    assert_eq!(env["AWS_CA_BUNDLE"], ca_bundle.display().to_string());
    // The JavaScript SDK reads no AWS_CA_BUNDLE; Node.js takes extra roots from this one.
    assert_eq!(env["NODE_EXTRA_CA_CERTS"], ca_bundle.display().to_string());
    assert_eq!(env["AWS_REGION"], "us-east-1");
    assert_eq!(env["AWS_DEFAULT_REGION"], "us-east-1");
    let agent: toml::Value = read_toml(&dir.join("agent.toml"));
    let front_port = agent["front"]["listen"]
        .as_str()
        .unwrap()
        .rsplit(':')
        .next()
        .unwrap()
        .to_string();
    assert_eq!(
        env["AWS_ENDPOINT_URL_BEDROCK_RUNTIME"],
        format!("https://localhost:{front_port}")
    );
    // Model discovery (`aws bedrock list-foundation-models`) goes to the same front.
    assert_eq!(
        env["AWS_ENDPOINT_URL_BEDROCK"],
        format!("https://localhost:{front_port}")
    );
    let token = &env["AWS_BEARER_TOKEN_BEDROCK"];
    assert!(token.starts_with("xpt_"), "{token}");
    // The OpenAI SDKs: the same front under /v1, the same token, the CA for httpx.
    assert_eq!(
        env["OPENAI_BASE_URL"],
        format!("https://localhost:{front_port}/v1")
    );
    assert_eq!(&env["OPENAI_API_KEY"], token);
    assert_eq!(env["SSL_CERT_FILE"], ca_bundle.display().to_string());
    assert_eq!(
        agent["principal"][0]["token_sha256"].as_str().unwrap(),
        hex_sha256(token)
    );
    assert!(
        !std::fs::read_to_string(dir.join("agent.toml"))
            .unwrap()
            .contains(token.as_str()),
        "agent.toml must hold only the token's hash"
    );
}

#[test]
fn keys_are_private_and_each_side_names_the_others_public_key() {
    let (_scratch, dir, _) = demo_once(&[]);
    for secret in [
        "agent.key",
        "relay.key",
        "front.key",
        "ca/ca.key",
        "caller.env",
    ] {
        let mode = std::fs::metadata(dir.join(secret))
            .unwrap()
            .permissions()
            .mode();
        assert_eq!(mode & 0o777, 0o600, "{secret} has mode {:o}", mode & 0o777);
    }
    let agent_key = xpart_tunnel::keys::read_private_key_file(dir.join("agent.key")).unwrap();
    let relay_key = xpart_tunnel::keys::read_private_key_file(dir.join("relay.key")).unwrap();
    let agent: toml::Value = read_toml(&dir.join("agent.toml"));
    let relay: toml::Value = read_toml(&dir.join("relay.toml"));
    assert_eq!(
        agent["relay"][0]["public_key"].as_str().unwrap(),
        relay_key.public_key().to_base64()
    );
    assert_eq!(
        relay["agent"][0]["public_key"].as_str().unwrap(),
        agent_key.public_key().to_base64()
    );
    assert_eq!(agent["tunnel"]["mode"].as_str(), Some("userspace"));
    assert_eq!(relay["tunnel"]["mode"].as_str(), Some("userspace"));
}

#[test]
fn json_reports_the_environment_commands_and_probe() {
    let (_scratch, _dir, run) = demo_once(&["--json"]);
    let report: serde_json::Value = serde_json::from_str(run.stdout.trim()).expect("one JSON");
    assert_eq!(report["self_probe"]["echoed"], true);
    assert_eq!(
        report["self_probe"]["outcome"]["reply"],
        "hello from xpart demo"
    );
    assert!(report["env"]["AWS_BEARER_TOKEN_BEDROCK"]
        .as_str()
        .unwrap()
        .starts_with("xpt_"));
    assert!(report["commands"]["aws_converse"]
        .as_str()
        .unwrap()
        .starts_with("aws bedrock-runtime converse --model-id xpart.echo --messages "));
}

#[test]
fn a_rerun_in_the_same_directory_replaces_the_earlier_demo() {
    let scratch = Scratch::new();
    let dir = scratch.path("demo");
    let first = demo(&dir, &["--once"]);
    assert_eq!(first.code, 0, "{first:?}");
    let first_env = std::fs::read_to_string(dir.join("caller.env")).unwrap();

    let second = demo(&dir, &["--once"]);

    assert_eq!(second.code, 0, "{second:?}");
    let second_env = std::fs::read_to_string(dir.join("caller.env")).unwrap();
    assert_ne!(
        exports(&first_env)["AWS_BEARER_TOKEN_BEDROCK"],
        exports(&second_env)["AWS_BEARER_TOKEN_BEDROCK"]
    );
    let audit = std::fs::read_to_string(dir.join("agent-audit.jsonl")).unwrap();
    assert_eq!(audit.lines().count(), 1, "the old audit log is replaced");
}

#[test]
fn a_directory_with_other_files_is_refused_and_left_alone() {
    let scratch = Scratch::new();
    let dir = scratch.path("precious");
    std::fs::create_dir(&dir).unwrap();
    std::fs::write(dir.join("agent.key"), "someone's real key\n").unwrap();

    let run = demo(&dir, &["--once"]);

    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr
            .contains("is not empty and was not made by `xpart demo`"),
        "{run:?}"
    );
    assert_eq!(
        std::fs::read_to_string(dir.join("agent.key")).unwrap(),
        "someone's real key\n"
    );
    assert_eq!(std::fs::read_dir(&dir).unwrap().count(), 1);
}

#[test]
fn a_taken_port_is_refused_naming_the_flag_before_anything_is_written() {
    let scratch = Scratch::new();
    let dir = scratch.path("demo");
    let taken = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    let port = taken.local_addr().unwrap().port().to_string();

    let dir_arg = dir.display().to_string();
    let ports = ["--front-port", &port, "--wg-port", "0", "--admin-port", "0"];
    let args = [&["demo", "--once", "--dir", &dir_arg], &ports[..]].concat();
    let run = run(Command::new(env!("CARGO_BIN_EXE_xpart")), &args, "");

    assert_eq!(run.code, 2, "{run:?}");
    assert!(
        run.stderr.contains(&format!("127.0.0.1:{port}")) && run.stderr.contains("--front-port"),
        "{run:?}"
    );
    assert!(!dir.exists());
}

/// A running demo, as the README leaves it for a user: `xpart status` on its relay (echo only,
/// by design) says ready with a note and exits 0, and Ctrl-C stops it at once when nothing is
/// in flight. Several rounds, because the wait this guards against did not happen every time.
#[test]
fn a_running_demo_is_ready_and_ctrl_c_stops_it_within_two_seconds() {
    for round in 0..4 {
        let scratch = Scratch::new();
        let mut running = RunningDemo::start(&scratch.path("demo"));

        if round == 0 {
            let relay_admin = running.admin("relay");
            let status = xpart(&["status", "--window", "0", "--relay", &relay_admin]);
            assert_eq!(status.code, 0, "{status:?}");
            assert!(status.stdout.contains(": ready"), "{status:?}");
            assert!(status.stdout.contains("note: echo only"), "{status:?}");
            assert!(status.stdout.contains("tunnel drops:"), "{status:?}");
        }

        let stopped_in = running.interrupt();
        assert!(
            stopped_in < Duration::from_secs(2),
            "round {round}: the demo took {stopped_in:?} to stop after SIGINT"
        );
    }
}

/// `xpart demo` left running, its stdout read on a thread.
struct RunningDemo {
    child: Child,
    printed: Vec<String>,
}

impl RunningDemo {
    fn start(dir: &Path) -> RunningDemo {
        let mut child = Command::new(env!("CARGO_BIN_EXE_xpart"))
            .arg("demo")
            .arg("--dir")
            .arg(dir)
            .args(FREE_PORTS)
            .env_remove("AWS_CA_BUNDLE")
            .env_remove("AWS_BEARER_TOKEN_BEDROCK")
            .stdout(Stdio::piped())
            .stderr(Stdio::null())
            .spawn()
            .expect("start xpart demo");
        let stdout = child.stdout.take().expect("piped stdout");
        let (lines, printed) = mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stdout).lines().map_while(Result::ok) {
                if lines.send(line).is_err() {
                    return;
                }
            }
        });
        let mut demo = RunningDemo {
            child,
            printed: Vec::new(),
        };
        loop {
            match printed.recv_timeout(Duration::from_secs(60)) {
                Ok(line) if line == "Running; press Ctrl-C to stop." => return demo,
                Ok(line) => demo.printed.push(line),
                Err(err) => panic!("the demo never said it runs ({err}): {:?}", demo.printed),
            }
        }
    }

    /// `http://127.0.0.1:PORT` from the printed `  relay  http://…/metrics …` line.
    fn admin(&self, daemon: &str) -> String {
        let prefix = format!("  {daemon}  ");
        let line = self
            .printed
            .iter()
            .find(|line| line.starts_with(&prefix))
            .unwrap_or_else(|| panic!("no admin line for {daemon}: {:?}", self.printed));
        line[prefix.len()..]
            .split("/metrics")
            .next()
            .expect("split yields at least one piece")
            .to_string()
    }

    /// Sends SIGINT and returns how long the demo took to exit (status 0 required).
    fn interrupt(&mut self) -> Duration {
        let pid = i32::try_from(self.child.id()).expect("pid fits in pid_t");
        let sent = Instant::now();
        // SAFETY: kill(2) with a live child's pid and a valid signal number.
        assert_eq!(unsafe { libc::kill(pid, libc::SIGINT) }, 0);
        let deadline = sent + Duration::from_secs(20);
        loop {
            if let Some(status) = self.child.try_wait().expect("wait for the demo") {
                assert_eq!(status.code(), Some(0), "{status:?}");
                return sent.elapsed();
            }
            assert!(Instant::now() < deadline, "the demo ignored SIGINT");
            std::thread::sleep(Duration::from_millis(10));
        }
    }
}

impl Drop for RunningDemo {
    fn drop(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

/// The caller's own credentials and region must not leak into the demo from the test's
/// environment, and the daemons' logs stay on stderr. Instance metadata is left as the host
/// has it: the demo's relay has `[credentials] source = "none"` and must never look.
fn demo(dir: &Path, extra: &[&str]) -> Run {
    let mut xpart = Command::new(env!("CARGO_BIN_EXE_xpart"));
    xpart
        .arg("demo")
        .arg("--dir")
        .arg(dir)
        .args(FREE_PORTS)
        .env_remove("AWS_CA_BUNDLE")
        .env_remove("NODE_EXTRA_CA_CERTS")
        .env_remove("AWS_BEARER_TOKEN_BEDROCK")
        .env_remove("AWS_EC2_METADATA_DISABLED");
    run(xpart, extra, "")
}

/// A `--once` demo with `extra` flags in a fresh directory, which succeeded; the directory
/// lives as long as the returned scratch.
fn demo_once(extra: &[&str]) -> (Scratch, PathBuf, Run) {
    let scratch = Scratch::new();
    let dir = scratch.path("demo");
    let run = demo(&dir, &[&["--once"], extra].concat());
    assert_eq!(run.code, 0, "{run:?}");
    (scratch, dir, run)
}

fn exports(text: &str) -> std::collections::BTreeMap<String, String> {
    text.lines()
        .filter_map(|line| line.strip_prefix("export "))
        .filter_map(|pair| pair.split_once('='))
        .map(|(name, value)| (name.to_string(), value.to_string()))
        .collect()
}

fn read_toml(path: &Path) -> toml::Value {
    let text =
        std::fs::read_to_string(path).unwrap_or_else(|err| panic!("{}: {err}", path.display()));
    toml::from_str(&text).unwrap_or_else(|err| panic!("{}: {err}", path.display()))
}

fn hex_sha256(text: &str) -> String {
    Sha256::digest(text.as_bytes())
        .iter()
        .map(|byte| format!("{byte:02x}"))
        .collect()
}
