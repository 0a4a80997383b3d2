//! Log format as a daemon under systemd produces it: stderr is a pipe, so lines are JSON.
//! The test runs itself again as a child process, because the subscriber is process-wide.

use std::process::Command;

const CHILD_ENV: &str = "XPART_DAEMON_LOGGING_CHILD";

#[test]
fn logs_are_json_lines_when_stderr_is_not_a_terminal() {
    if std::env::var_os(CHILD_ENV).is_some() {
        xpart_daemon::logging::init("relay");
        tracing::debug!("filtered out at the default level");
        tracing::info!(request_id = "req-7", status = 429, "request refused");
        return;
    }
    let output = Command::new(std::env::current_exe().unwrap())
        .args([
            "--exact",
            "logs_are_json_lines_when_stderr_is_not_a_terminal",
            "--nocapture",
            "--test-threads=1",
        ])
        .env(CHILD_ENV, "1")
        .env_remove("RUST_LOG")
        .output()
        .unwrap();
    assert!(output.status.success(), "child failed: {output:?}");
    let stderr = String::from_utf8(output.stderr).unwrap();
    let events: Vec<serde_json::Value> = stderr
        .lines()
        .map(|line| {
            serde_json::from_str(line).unwrap_or_else(|err| panic!("not JSON ({err}): {line}"))
        })
        .collect();
    assert_eq!(events.len(), 2, "{stderr}");
    assert_eq!(events[0]["message"], "logging started");
    assert_eq!(events[0]["service"], "relay");
    assert_eq!(events[1]["level"], "INFO");
    assert_eq!(events[1]["message"], "request refused");
    assert_eq!(events[1]["request_id"], "req-7");
    assert_eq!(events[1]["status"], 429);
    assert!(events[1]["timestamp"].is_string());
}
