//! Running the built `xpart` and the tools its output must work with, and scratch
//! directories; shared by the command tests and `tests/demo.rs`.

#![allow(dead_code)] // each test crate uses a different part

use std::io::Write;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::sync::atomic::{AtomicUsize, Ordering};

#[derive(Debug)]
pub struct Run {
    pub code: i32,
    pub stdout: String,
    pub stderr: String,
}

pub fn xpart(args: &[&str]) -> Run {
    xpart_with_stdin(args, "")
}

pub fn xpart_with_stdin(args: &[&str], stdin: &str) -> Run {
    let mut xpart = Command::new(env!("CARGO_BIN_EXE_xpart"));
    xpart
        .env_remove("AWS_CA_BUNDLE")
        .env_remove("AWS_BEARER_TOKEN_BEDROCK");
    run(xpart, args, stdin)
}

/// Runs `command` with `args`, `stdin` written to it, and collects what it printed; for
/// xpart and the tools its output must work with (wg, wg-quick).
pub fn run(mut command: Command, args: &[&str], stdin: &str) -> Run {
    let mut child = command
        .args(args)
        .stdin(Stdio::piped())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap_or_else(|err| panic!("spawn {command:?}: {err}"));
    child
        .stdin
        .take()
        .expect("stdin is piped")
        .write_all(stdin.as_bytes())
        .expect("write stdin");
    let Output {
        status,
        stdout,
        stderr,
    } = child.wait_with_output().expect("wait for the command");
    Run {
        code: status.code().expect("the command exited by signal"),
        stdout: String::from_utf8(stdout).expect("utf-8 stdout"),
        stderr: String::from_utf8(stderr).expect("utf-8 stderr"),
    }
}

impl Run {
    #[track_caller]
    pub fn ok(self) -> Run {
        self.fails_with(0)
    }

    /// Asserts the exit code (`ok` for 0).
    #[track_caller]
    pub fn fails_with(self, code: i32) -> Run {
        let Run { stdout, stderr, .. } = &self;
        assert_eq!(self.code, code, "stdout:\n{stdout}\nstderr:\n{stderr}");
        self
    }

    /// Asserts that stdout contains `text`.
    #[track_caller]
    pub fn says(&self, text: &str) -> &Run {
        self.shows(Stream::Stdout, text)
    }

    /// Asserts that stderr contains `text`.
    #[track_caller]
    pub fn complains(&self, text: &str) -> &Run {
        self.shows(Stream::Stderr, text)
    }

    #[track_caller]
    fn shows(&self, stream: Stream, text: &str) -> &Run {
        let output = match stream {
            Stream::Stdout => &self.stdout,
            Stream::Stderr => &self.stderr,
        };
        assert!(
            output.contains(text),
            "{text:?} not in {stream:?}:\n{output}"
        );
        self
    }

    pub fn json(&self) -> serde_json::Value {
        serde_json::from_str(&self.stdout).unwrap_or_else(|err| panic!("{err}: {}", self.stdout))
    }
}

#[derive(Debug, Clone, Copy)]
enum Stream {
    Stdout,
    Stderr,
}

/// A scratch directory removed on drop.
pub struct Scratch(PathBuf);

impl Scratch {
    pub fn new() -> Scratch {
        static NEXT: AtomicUsize = AtomicUsize::new(0);
        let dir = std::env::temp_dir().join(format!(
            "xpart-cli-test-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        std::fs::create_dir_all(&dir).expect("create scratch dir");
        Scratch(dir)
    }

    pub fn path(&self, name: &str) -> PathBuf {
        self.0.join(name)
    }

    pub fn arg(&self, name: &str) -> String {
        self.path(name).display().to_string()
    }

    pub fn write(&self, name: &str, contents: &str) -> PathBuf {
        let path = self.path(name);
        std::fs::write(&path, contents).expect("write scratch file");
        path
    }
}

impl Drop for Scratch {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.0);
    }
}

pub fn mode(path: &Path) -> u32 {
    std::fs::metadata(path).expect("stat").permissions().mode() & 0o777
}

pub fn chmod(path: &Path, mode: u32) {
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(mode)).expect("chmod");
}

pub fn tool_available(tool: &str) -> bool {
    Command::new("sh")
        .args(["-c", &format!("command -v {tool}")])
        .stdout(Stdio::null())
        .status()
        .map(|status| status.success())
        .unwrap_or(false)
}
