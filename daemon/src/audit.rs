//! The audit trail: one JSON line per request, allowed or refused, written by a background
//! task so a slow disk never delays a request.
//!
//! A request handler fills an [`AuditRecord`] and hands it to [`AuditLog::record`], which
//! only queues it (a bounded channel). The writer task appends the lines and flushes after
//! each batch. When the queue is full (the disk stalls) records are dropped and counted in
//! `xpart_audit_records_dropped_total` rather than blocking. [`AuditLog::reopen`] starts a
//! new file at the same path (for logrotate; the daemon calls it on SIGHUP), and
//! [`AuditLog::close`] flushes everything queued before shutdown.
//!
//! The schema has no place for request or response bodies, headers or bearer tokens: they
//! cannot end up in the log by accident. Token *counts* (model usage) are numbers, written
//! only when the answer reported them.

use std::fs::OpenOptions;
use std::io;
use std::net::IpAddr;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::time::SystemTime;

use prometheus::{IntCounter, Registry};
use serde::{Deserialize, Serialize};
use tokio::io::AsyncWriteExt;
use tokio::sync::{mpsc, oneshot};

use xpart_bedrock::{ModelId, Operation};

/// How many records may wait for the disk before new ones are dropped.
pub const QUEUE_CAPACITY: usize = 16_384;

/// Longest `message` kept in a record; refusal reasons are short, and a long one is
/// truncated rather than letting callers fill the log.
pub const MAX_MESSAGE_CHARS: usize = 256;

/// Which daemon wrote a record.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Service {
    Agent,
    Relay,
}

/// One request, as one JSON line.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AuditRecord {
    /// When the request arrived: RFC 3339, UTC, milliseconds (`2025-01-02T03:04:05.678Z`).
    pub time: String,
    pub service: Service,
    pub request_id: String,
    /// The authenticated principal; `None` when authentication failed.
    pub principal: Option<String>,
    /// The caller's address (agent only).
    pub source: Option<IpAddr>,
    /// `None` when the path names no operation.
    pub operation: Option<Operation>,
    /// Percent-decoded model id, when the operation names one.
    pub model: Option<ModelId>,
    /// The relay the agent used (agent only).
    pub relay: Option<String>,
    pub status: u16,
    /// The error code (`ThrottlingException`) when the request failed.
    pub error_type: Option<String>,
    /// A short reason for a refusal or failure.
    pub message: Option<String>,
    pub latency_ms: f64,
    pub upstream_latency_ms: Option<f64>,
    pub bytes_in: u64,
    pub bytes_out: u64,
    /// Model usage as the answer reported it (both daemons); absent when it reported none, so
    /// readers can tell "no usage known" from zero.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub input_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub output_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_read_tokens: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache_write_tokens: Option<u64>,
    /// On a successful answer that reports usage (InvokeModel, InvokeModelWithResponseStream,
    /// Converse, ConverseStream): whether its whole usage report was read. `false` when the
    /// answer ended or was cut before it (a stream stopped before its `metadata` event): the
    /// token fields then hold only what was known, and budgets charged only that.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub usage_complete: Option<bool>,
    /// The agent's OpenAI endpoint the request came in on (`openai /v1/chat/completions`),
    /// when it was not a native Bedrock call; `operation` is what it became.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub endpoint: Option<String>,
    /// OpenAI's `user` field as the caller sent it (at most [`MAX_MESSAGE_CHARS`] characters).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub end_user: Option<String>,
}

impl AuditRecord {
    /// A record stamped with the current time; the caller fills in the rest.
    pub fn new(service: Service, request_id: impl Into<String>) -> AuditRecord {
        AuditRecord {
            time: format_time(SystemTime::now()),
            service,
            request_id: request_id.into(),
            principal: None,
            source: None,
            operation: None,
            model: None,
            relay: None,
            status: 0,
            error_type: None,
            message: None,
            latency_ms: 0.0,
            upstream_latency_ms: None,
            bytes_in: 0,
            bytes_out: 0,
            input_tokens: None,
            output_tokens: None,
            cache_read_tokens: None,
            cache_write_tokens: None,
            usage_complete: None,
            endpoint: None,
            end_user: None,
        }
    }
}

/// RFC 3339 in UTC with milliseconds, e.g. `2025-01-02T03:04:05.678Z`.
pub fn format_time(at: SystemTime) -> String {
    let at = time::OffsetDateTime::from(at);
    format!(
        "{:04}-{:02}-{:02}T{:02}:{:02}:{:02}.{:03}Z",
        at.year(),
        u8::from(at.month()),
        at.day(),
        at.hour(),
        at.minute(),
        at.second(),
        at.millisecond()
    )
}

/// A handle on the audit writer; clones share one file and one queue.
#[derive(Clone)]
pub struct AuditLog {
    queue: Option<mpsc::Sender<Command>>,
    written: IntCounter,
    dropped: IntCounter,
}

enum Command {
    Record(Box<AuditRecord>),
    Flush(oneshot::Sender<()>),
    Reopen(oneshot::Sender<io::Result<()>>),
    Close(oneshot::Sender<()>),
}

impl AuditLog {
    /// Open (append, creating it and its parent directories) the log at `path` and start
    /// the writer task. Must be called inside a Tokio runtime.
    pub fn open(path: impl AsRef<Path>) -> io::Result<AuditLog> {
        AuditLog::open_with_capacity(path, QUEUE_CAPACITY)
    }

    /// [`AuditLog::open`] with a chosen queue length.
    pub fn open_with_capacity(path: impl AsRef<Path>, capacity: usize) -> io::Result<AuditLog> {
        let path = path.as_ref().to_path_buf();
        let Ok(runtime) = tokio::runtime::Handle::try_current() else {
            return Err(io::Error::other("the audit log needs a Tokio runtime"));
        };
        let file = open_file(&path)?;
        let (queue, commands) = mpsc::channel(capacity.max(1));
        let log = AuditLog {
            queue: Some(queue),
            written: written_counter(),
            dropped: dropped_counter(),
        };
        runtime.spawn(write_records(
            path,
            file,
            commands,
            log.written.clone(),
            log.dropped.clone(),
        ));
        Ok(log)
    }

    /// A log that records nothing (no `[audit]` configured).
    pub fn disabled() -> AuditLog {
        AuditLog {
            queue: None,
            written: written_counter(),
            dropped: dropped_counter(),
        }
    }

    /// Register the written and dropped counters with a daemon's registry.
    pub fn register(&self, registry: &Registry) -> prometheus::Result<()> {
        registry.register(Box::new(self.written.clone()))?;
        registry.register(Box::new(self.dropped.clone()))?;
        Ok(())
    }

    /// Queue a record without waiting. When the queue is full or the log is closed, the
    /// record is counted as dropped.
    pub fn record(&self, record: AuditRecord) {
        let Some(queue) = &self.queue else {
            return;
        };
        if let Err(err) = queue.try_send(Command::Record(Box::new(record))) {
            if self.dropped.get() == 0 {
                tracing::warn!(error = %err, "audit queue unavailable; dropping audit records");
            }
            self.dropped.inc();
        }
    }

    /// Records written so far.
    pub fn written(&self) -> u64 {
        self.written.get()
    }

    /// Records dropped so far: the queue was full or closed, or the write failed.
    pub fn dropped(&self) -> u64 {
        self.dropped.get()
    }

    /// Wait until every record queued before this call is on disk (flushed to the OS).
    pub async fn flush(&self) {
        let Some(queue) = &self.queue else {
            return;
        };
        let (done, wait) = oneshot::channel();
        if queue.send(Command::Flush(done)).await.is_ok() {
            let _ = wait.await;
        }
    }

    /// Close the file and open the path again, so a rotated file is left alone and a new
    /// one started (logrotate's `create` mode; call it on SIGHUP).
    pub async fn reopen(&self) -> io::Result<()> {
        let Some(queue) = &self.queue else {
            return Ok(());
        };
        let (done, wait) = oneshot::channel();
        if queue.send(Command::Reopen(done)).await.is_err() {
            return Err(io::Error::other("the audit log is closed"));
        }
        let Ok(result) = wait.await else {
            return Err(io::Error::other("the audit writer stopped"));
        };
        result
    }

    /// Write everything queued before this call, flush, and stop the writer; records
    /// queued afterwards are dropped.
    pub async fn close(&self) {
        let Some(queue) = &self.queue else {
            return;
        };
        let (done, wait) = oneshot::channel();
        if queue.send(Command::Close(done)).await.is_ok() {
            let _ = wait.await;
        }
    }
}

fn written_counter() -> IntCounter {
    // Infallible: the name and help are constant and valid.
    IntCounter::new(
        "xpart_audit_records_written_total",
        "Audit records written to the audit log",
    )
    .expect("valid metric")
}

fn dropped_counter() -> IntCounter {
    // Infallible: the name and help are constant and valid.
    IntCounter::new(
        "xpart_audit_records_dropped_total",
        "Audit records lost: the audit queue was full or closed, or the write failed",
    )
    .expect("valid metric")
}

fn open_file(path: &Path) -> io::Result<tokio::fs::File> {
    if let Some(parent) = path.parent() {
        if !parent.as_os_str().is_empty() {
            std::fs::create_dir_all(parent)?;
        }
    }
    // Principals and caller addresses are not for every local user.
    let file = OpenOptions::new()
        .create(true)
        .append(true)
        .mode(0o640)
        .open(path)?;
    Ok(tokio::fs::File::from_std(file))
}

/// The writer task: takes the records queued so far, writes them with one `write` and
/// flushes, then carries out a control command if one ended the batch.
async fn write_records(
    path: PathBuf,
    mut file: tokio::fs::File,
    mut commands: mpsc::Receiver<Command>,
    written: IntCounter,
    dropped: IntCounter,
) {
    let mut failing = false;
    while let Some(first) = commands.recv().await {
        let mut batch = Vec::new();
        let mut records = 0;
        let mut control = None;
        let mut next = Some(first);
        while let Some(command) = next.take() {
            let Command::Record(record) = command else {
                control = Some(command);
                break;
            };
            encode_line(&mut batch, *record);
            records += 1;
            if batch.len() < MAX_BATCH_BYTES {
                next = commands.try_recv().ok();
            }
        }
        if records > 0 {
            let result = write_batch(&mut file, &batch).await;
            report(&path, &result, &mut failing);
            match result {
                Ok(()) => written.inc_by(records),
                Err(_) => dropped.inc_by(records),
            }
        }
        match control {
            None => {}
            // A record never ends a batch; it is matched to keep the match exhaustive.
            Some(Command::Record(_)) => {}
            Some(Command::Flush(done)) => {
                let _ = done.send(());
            }
            Some(Command::Reopen(done)) => {
                let reply = match open_file(&path) {
                    Ok(reopened) => {
                        file = reopened;
                        Ok(())
                    }
                    Err(err) => Err(err),
                };
                let _ = done.send(reply);
            }
            Some(Command::Close(done)) => {
                commands.close();
                let _ = done.send(());
                return;
            }
        }
    }
}

/// Bytes gathered into one write before the writer goes to the disk.
const MAX_BATCH_BYTES: usize = 256 * 1024;

fn encode_line(batch: &mut Vec<u8>, mut record: AuditRecord) {
    if let Some(message) = &mut record.message {
        if let Some((cut, _)) = message.char_indices().nth(MAX_MESSAGE_CHARS) {
            message.truncate(cut);
        }
    }
    // Serializing this struct cannot fail: every field is a string, a number or null
    // (serde_json writes non-finite floats as null).
    if serde_json::to_writer(&mut *batch, &record).is_ok() {
        batch.push(b'\n');
    }
}

async fn write_batch(file: &mut tokio::fs::File, batch: &[u8]) -> io::Result<()> {
    file.write_all(batch).await?;
    // tokio's File completes writes in the background; flush surfaces their errors.
    file.flush().await
}

/// Log the first failure of a run of failures, and the recovery, not every line.
fn report(path: &Path, result: &io::Result<()>, failing: &mut bool) {
    match (result, *failing) {
        (Err(err), false) => {
            tracing::error!(path = %path.display(), error = %err, "cannot write the audit log");
            *failing = true;
        }
        (Ok(()), true) => {
            tracing::info!(path = %path.display(), "writing the audit log again");
            *failing = false;
        }
        (Err(_), true) => {}
        (Ok(()), false) => {}
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::time::{Duration, UNIX_EPOCH};

    #[test]
    fn time_is_rfc3339_utc_with_milliseconds() {
        let at = UNIX_EPOCH + Duration::from_millis(1_735_787_045_678);
        assert_eq!(format_time(at), "2025-01-02T03:04:05.678Z");
        assert_eq!(format_time(UNIX_EPOCH), "1970-01-01T00:00:00.000Z");
    }
}
