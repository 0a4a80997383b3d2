//! The audit log as a daemon uses it: records queued from the request path, JSON lines on
//! disk, drops counted when the queue is full, rotation, shutdown flush.

use std::net::IpAddr;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};

use xpart_bedrock::{ModelId, Operation};
use xpart_daemon::audit::{AuditLog, AuditRecord, Service, MAX_MESSAGE_CHARS};

const SCHEMA_FIELDS: [&str; 15] = [
    "time",
    "service",
    "request_id",
    "principal",
    "source",
    "operation",
    "model",
    "relay",
    "status",
    "error_type",
    "message",
    "latency_ms",
    "upstream_latency_ms",
    "bytes_in",
    "bytes_out",
];

#[tokio::test]
async fn records_become_json_lines_with_the_schema_fields() {
    let dir = scratch_dir("schema");
    let path = dir.join("nested/dirs/audit.jsonl");
    let log = AuditLog::open(&path).unwrap();

    let allowed = agent_record("req-1", 200, None);
    let mut refused = agent_record("req-2", 429, Some("ThrottlingException"));
    refused.message = Some("principal summarizer exceeded 50 requests per second".into());
    let mut relay = AuditRecord::new(Service::Relay, "req-3");
    relay.operation = None;
    relay.status = 404;
    relay.error_type = Some("UnknownOperationException".into());
    log.record(allowed.clone());
    log.record(refused.clone());
    log.clone().record(relay.clone());
    log.close().await;

    let lines = read_lines(&path);
    assert_eq!(lines.len(), 3);
    for line in &lines {
        let value: serde_json::Value = serde_json::from_str(line).unwrap();
        let object = value.as_object().unwrap();
        let mut keys: Vec<&str> = object.keys().map(String::as_str).collect();
        keys.sort();
        let mut expected = SCHEMA_FIELDS;
        expected.sort();
        assert_eq!(keys, expected, "{line}");
        let time = object["time"].as_str().unwrap();
        assert_eq!(time.len(), "2025-01-02T03:04:05.678Z".len(), "{time}");
        assert!(time.ends_with('Z') && time.as_bytes()[19] == b'.', "{time}");
    }
    let parsed: Vec<AuditRecord> = lines
        .iter()
        .map(|line| serde_json::from_str(line).unwrap())
        .collect();
    assert_eq!(parsed, [allowed, refused, relay]);
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["service"], "agent");
    assert_eq!(first["source"], "10.0.16.5");
    assert_eq!(first["operation"], "Converse");
    assert_eq!(first["model"], "anthropic.claude-3-haiku-20240307-v1:0");
    assert_eq!(first["error_type"], serde_json::Value::Null);
    let third: serde_json::Value = serde_json::from_str(&lines[2]).unwrap();
    assert_eq!(third["service"], "relay");
    assert_eq!(third["principal"], serde_json::Value::Null);
    assert_eq!(third["operation"], serde_json::Value::Null);
    assert_eq!(log.written(), 3);
    assert_eq!(log.dropped(), 0);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn token_counts_are_written_only_when_the_answer_reported_them() {
    let (dir, path) = audit_path("tokens");
    let log = AuditLog::open(&path).unwrap();
    let mut counted = agent_record("req-tokens", 200, None);
    counted.input_tokens = Some(1200);
    counted.output_tokens = Some(345);
    counted.cache_read_tokens = Some(1000);
    counted.cache_write_tokens = Some(0);
    log.record(counted.clone());
    log.record(agent_record("req-none", 200, None));
    log.close().await;

    let lines = read_lines(&path);
    let first: serde_json::Value = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(first["input_tokens"], 1200);
    assert_eq!(first["output_tokens"], 345);
    assert_eq!(first["cache_read_tokens"], 1000);
    assert_eq!(first["cache_write_tokens"], 0);
    assert_eq!(
        serde_json::from_str::<AuditRecord>(&lines[0]).unwrap(),
        counted
    );
    let second: serde_json::Value = serde_json::from_str(&lines[1]).unwrap();
    for field in [
        "input_tokens",
        "output_tokens",
        "cache_read_tokens",
        "cache_write_tokens",
    ] {
        assert!(second.get(field).is_none(), "{field} in {}", lines[1]);
    }
    assert_eq!(
        serde_json::from_str::<AuditRecord>(&lines[1])
            .unwrap()
            .input_tokens,
        None
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn long_messages_are_truncated() {
    let (dir, path) = audit_path("truncate");
    let log = AuditLog::open(&path).unwrap();
    let mut record = agent_record("req-long", 400, Some("ValidationException"));
    record.message = Some("é".repeat(MAX_MESSAGE_CHARS * 3));
    log.record(record);
    log.close().await;
    let lines = read_lines(&path);
    let parsed: AuditRecord = serde_json::from_str(&lines[0]).unwrap();
    assert_eq!(parsed.message.unwrap().chars().count(), MAX_MESSAGE_CHARS);
    std::fs::remove_dir_all(dir).unwrap();
}

/// On a current-thread runtime the writer task cannot run while the test records without
/// yielding, which is what a stalled disk looks like from the request path.
#[tokio::test(flavor = "current_thread")]
async fn a_full_queue_drops_and_counts_instead_of_blocking() {
    let (dir, path) = audit_path("drops");
    let log = AuditLog::open_with_capacity(&path, 4).unwrap();
    let registry = prometheus::Registry::new();
    log.register(&registry).unwrap();
    for i in 0..10 {
        log.record(agent_record(&format!("req-{i}"), 200, None));
    }
    assert_eq!(log.dropped(), 6);
    log.close().await;
    let ids: Vec<String> = read_lines(&path)
        .iter()
        .map(|line| {
            serde_json::from_str::<AuditRecord>(line)
                .unwrap_or_else(|err| panic!("{err}: {line}"))
                .request_id
        })
        .collect();
    assert_eq!(ids, ["req-0", "req-1", "req-2", "req-3"]);

    let metrics = gathered(&registry);
    assert_eq!(metrics["xpart_audit_records_dropped_total"], 6.0);
    assert_eq!(metrics["xpart_audit_records_written_total"], 4.0);

    log.record(agent_record("after-close", 200, None));
    assert_eq!(log.dropped(), 7);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn failed_writes_are_counted_as_dropped() {
    let full = Path::new("/dev/full");
    if !full.exists() {
        eprintln!("skipped: /dev/full is not available to simulate a full disk");
        return;
    }
    let log = AuditLog::open(full).unwrap();
    for i in 0..3 {
        log.record(agent_record(&format!("req-{i}"), 200, None));
    }
    log.flush().await;
    assert_eq!((log.written(), log.dropped()), (0, 3));
    log.close().await;
}

#[tokio::test]
async fn reopen_starts_a_new_file_after_rotation() {
    let (dir, path) = audit_path("reopen");
    let rotated = dir.join("audit.jsonl.1");
    let log = AuditLog::open(&path).unwrap();
    log.record(agent_record("before", 200, None));
    log.flush().await;
    std::fs::rename(&path, &rotated).unwrap();
    log.reopen().await.unwrap();
    log.record(agent_record("after", 200, None));
    log.close().await;
    assert_eq!(request_ids(&rotated), ["before"]);
    assert_eq!(request_ids(&path), ["after"]);
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn existing_lines_are_kept_and_the_file_is_not_world_readable() {
    let (dir, path) = audit_path("append");
    let earlier = serde_json::to_string(&agent_record("earlier", 200, None)).unwrap();
    std::fs::write(&path, format!("{earlier}\n")).unwrap();
    let log = AuditLog::open(&path).unwrap();
    log.record(agent_record("later", 200, None));
    log.close().await;
    assert_eq!(request_ids(&path), ["earlier", "later"]);

    let fresh = dir.join("fresh.jsonl");
    let log = AuditLog::open(&fresh).unwrap();
    log.close().await;
    let mode = std::fs::metadata(&fresh).unwrap().permissions().mode() & 0o777;
    assert_eq!(
        mode & 0o007,
        0,
        "audit file mode {mode:o} is readable by others"
    );
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn open_errors_are_returned() {
    let dir = scratch_dir("errors");
    let blocker = dir.join("not-a-dir");
    std::fs::write(&blocker, "").unwrap();
    assert!(AuditLog::open(blocker.join("audit.jsonl")).is_err());
    std::fs::remove_dir_all(dir).unwrap();
}

#[test]
fn open_outside_a_runtime_is_an_error_not_a_panic() {
    let dir = scratch_dir("no-runtime");
    let err = AuditLog::open(dir.join("audit.jsonl"))
        .err()
        .expect("needs a runtime");
    assert!(err.to_string().contains("Tokio runtime"), "{err}");
    std::fs::remove_dir_all(dir).unwrap();
}

#[tokio::test]
async fn disabled_log_accepts_records_and_writes_nothing() {
    let log = AuditLog::disabled();
    log.record(agent_record("x", 200, None));
    log.flush().await;
    log.reopen().await.unwrap();
    log.close().await;
    assert_eq!((log.written(), log.dropped()), (0, 0));
}

fn agent_record(request_id: &str, status: u16, error_type: Option<&str>) -> AuditRecord {
    let mut record = AuditRecord::new(Service::Agent, request_id);
    record.principal = Some("summarizer-lambda".into());
    record.source = Some(IpAddr::from([10, 0, 16, 5]));
    record.operation = Some(Operation::Converse);
    record.model = Some(ModelId::new("anthropic.claude-3-haiku-20240307-v1:0"));
    record.relay = Some("relay-a".into());
    record.status = status;
    record.error_type = error_type.map(str::to_string);
    record.latency_ms = 12.5;
    record.upstream_latency_ms = Some(10.25);
    record.bytes_in = 321;
    record.bytes_out = 654;
    record
}

/// A fresh scratch directory and the audit file's path in it.
fn audit_path(name: &str) -> (PathBuf, PathBuf) {
    let dir = scratch_dir(name);
    let path = dir.join("audit.jsonl");
    (dir, path)
}

fn scratch_dir(name: &str) -> PathBuf {
    let dir =
        std::env::temp_dir().join(format!("xpart-daemon-audit-{}-{name}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    std::fs::create_dir_all(&dir).expect("create the scratch directory");
    dir
}

fn read_lines(path: &Path) -> Vec<String> {
    std::fs::read_to_string(path)
        .unwrap_or_else(|err| panic!("{}: {err}", path.display()))
        .lines()
        .map(str::to_string)
        .collect()
}

fn request_ids(path: &Path) -> Vec<String> {
    read_lines(path)
        .iter()
        .map(|line| {
            serde_json::from_str::<AuditRecord>(line)
                .unwrap_or_else(|err| panic!("{err}: {line}"))
                .request_id
        })
        .collect()
}

fn gathered(registry: &prometheus::Registry) -> std::collections::HashMap<String, f64> {
    registry
        .gather()
        .iter()
        .map(|family| {
            (
                family.name().to_string(),
                family.get_metric()[0].get_counter().get_value(),
            )
        })
        .collect()
}
