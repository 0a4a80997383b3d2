//! What a daemon writes when a request is finished: one audit line and one count in its
//! request metrics, exactly once, however the request ended (refused, answered, its response
//! streamed to the end, broken off, or dropped unanswered).
//!
//! A request handler makes a [`Recorder`] when the request arrives, fills its
//! [`AuditRecord`] as the steps learn things, and calls [`Recorder::finish`]; a streamed
//! response moves the recorder into the body's [`OnEnd`] hook, which the body calls with its
//! [`Ending`]. The metric names and labels are each daemon's own ([`RequestMetrics`]); the
//! audit schema is shared.

use std::sync::Arc;
use std::time::{Duration, Instant};

use crate::audit::{AuditLog, AuditRecord};

/// How a streamed response body ended.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Ending {
    /// Every byte was handed to the server.
    Complete,
    /// The stream from the sending side failed (reset, connection lost); its reason.
    Failed(String),
    /// The sending side sent nothing for longer than the idle limit.
    IdleTimeout(Duration),
    /// The sending side was declared dead while the body was streaming.
    Lost,
    /// The reader stopped reading (dropped the body) before the end.
    Abandoned,
}

/// A body's end-of-stream hook: called once, with how the body ended and how many bytes of
/// it went out; later calls do nothing.
pub struct OnEnd(Option<Box<dyn FnOnce(Ending, u64) + Send>>);

impl OnEnd {
    pub fn new(hook: impl FnOnce(Ending, u64) + Send + 'static) -> OnEnd {
        OnEnd(Some(Box::new(hook)))
    }

    pub fn end(&mut self, ending: Ending, bytes: u64) {
        if let Some(hook) = self.0.take() {
            hook(ending, bytes);
        }
    }

    pub fn has_ended(&self) -> bool {
        self.0.is_none()
    }
}

/// A daemon's request metrics, counted once per finished request.
pub trait RequestMetrics: Send + Sync {
    /// `model_label` is what [`Recorder::label_model`] set, if anything: never the caller's
    /// model id, so callers cannot grow the label set.
    fn finished(&self, record: &AuditRecord, model_label: Option<&str>, latency: Duration);
}

/// One request's audit line in the making, its clock, and where it goes when finished.
pub struct Recorder {
    /// Filled by the request's steps; status, error, message, bytes out and latency are set
    /// by [`Recorder::finish`].
    pub record: AuditRecord,
    started: Instant,
    model_label: Option<String>,
    /// `None` once the line is written (or handed on by [`Recorder::take`]).
    sink: Option<Sink>,
}

struct Sink {
    log: AuditLog,
    metrics: Arc<dyn RequestMetrics>,
    if_dropped: Option<(u16, &'static str)>,
}

impl Recorder {
    /// Starts the clock for a request whose record has been begun.
    pub fn new(record: AuditRecord, log: AuditLog, metrics: Arc<dyn RequestMetrics>) -> Recorder {
        Recorder {
            record,
            started: Instant::now(),
            model_label: None,
            sink: Some(Sink {
                log,
                metrics,
                if_dropped: None,
            }),
        }
    }

    /// A recorder dropped unfinished (its request's future was dropped: the peer went away)
    /// writes its line with this status and message; by default it writes nothing.
    pub fn if_dropped(mut self, status: u16, message: &'static str) -> Recorder {
        if let Some(sink) = self.sink.as_mut() {
            sink.if_dropped = Some((status, message));
        }
        self
    }

    pub fn request_id(&self) -> &str {
        &self.record.request_id
    }

    /// The `model` metric label: configuration text (the allowlist entry that matched).
    pub fn label_model(&mut self, label: impl Into<String>) {
        self.model_label = Some(label.into());
    }

    /// The recorder with the line still to write, leaving this one spent (it writes nothing):
    /// for a response body that finishes the request after the handler has returned.
    pub fn take(&mut self) -> Recorder {
        Recorder {
            record: self.record.clone(),
            started: self.started,
            model_label: self.model_label.clone(),
            sink: self.sink.take(),
        }
    }

    /// Writes the audit line and counts the request. `error_type` is the error code
    /// (`ThrottlingException`) whoever produced it; `message` a short reason.
    pub fn finish(
        mut self,
        status: u16,
        error_type: Option<String>,
        message: Option<String>,
        bytes_out: u64,
    ) {
        self.write(status, error_type, message, bytes_out);
    }

    fn write(
        &mut self,
        status: u16,
        error_type: Option<String>,
        message: Option<String>,
        bytes_out: u64,
    ) {
        let Some(sink) = self.sink.take() else {
            return;
        };
        let latency = self.started.elapsed();
        let service = self.record.service;
        let mut record = std::mem::replace(&mut self.record, AuditRecord::new(service, ""));
        record.status = status;
        record.error_type = error_type;
        record.message = message;
        record.bytes_out = bytes_out;
        record.latency_ms = latency.as_secs_f64() * 1000.0;
        sink.metrics
            .finished(&record, self.model_label.as_deref(), latency);
        sink.log.record(record);
    }
}

impl Drop for Recorder {
    fn drop(&mut self) {
        if let Some((status, message)) = self.sink.as_ref().and_then(|sink| sink.if_dropped) {
            self.write(status, None, Some(message.to_owned()), 0);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::audit::Service;
    use std::sync::Mutex;

    /// What the metrics saw: (status, model label) per finished request.
    #[derive(Default)]
    struct Counted(Mutex<Vec<(u16, Option<String>)>>);

    impl RequestMetrics for Counted {
        fn finished(&self, record: &AuditRecord, model_label: Option<&str>, _: Duration) {
            self.0
                .lock()
                .expect("test lock")
                .push((record.status, model_label.map(str::to_owned)));
        }
    }

    fn recorder(counted: &Arc<Counted>) -> Recorder {
        let record = AuditRecord::new(Service::Relay, "id-1");
        Recorder::new(record, AuditLog::disabled(), counted.clone())
    }

    fn seen(counted: &Counted) -> Vec<(u16, Option<String>)> {
        counted.0.lock().expect("test lock").clone()
    }

    #[test]
    fn finish_counts_once_with_the_label() {
        let counted = Arc::new(Counted::default());
        let mut r = recorder(&counted);
        assert_eq!(r.request_id(), "id-1");
        r.label_model("anthropic.*");
        r.finish(200, None, None, 10);
        assert_eq!(seen(&counted), vec![(200, Some("anthropic.*".to_owned()))]);
    }

    #[test]
    fn dropped_unfinished_writes_only_when_asked() {
        let counted = Arc::new(Counted::default());
        drop(recorder(&counted));
        assert_eq!(seen(&counted), vec![]);
        drop(recorder(&counted).if_dropped(499, "gone"));
        assert_eq!(seen(&counted), vec![(499, None)]);
        recorder(&counted)
            .if_dropped(499, "gone")
            .finish(200, None, None, 0);
        assert_eq!(seen(&counted), vec![(499, None), (200, None)]);
    }

    #[test]
    fn a_taken_recorder_writes_and_the_spent_one_does_not() {
        let counted = Arc::new(Counted::default());
        let mut spent = recorder(&counted).if_dropped(499, "gone");
        spent.label_model("m");
        let live = spent.take();
        drop(spent);
        assert_eq!(seen(&counted), vec![]);
        assert_eq!(live.request_id(), "id-1");
        live.finish(503, Some("ServiceUnavailableException".into()), None, 0);
        assert_eq!(seen(&counted), vec![(503, Some("m".to_owned()))]);
    }

    #[test]
    fn on_end_calls_its_hook_once() {
        let ends = Arc::new(Mutex::new(Vec::new()));
        let sink = ends.clone();
        let mut on_end =
            OnEnd::new(move |ending, bytes| sink.lock().expect("test lock").push((ending, bytes)));
        assert!(!on_end.has_ended());
        on_end.end(Ending::Complete, 3);
        on_end.end(Ending::Abandoned, 4);
        assert!(on_end.has_ended());
        assert_eq!(
            *ends.lock().expect("test lock"),
            vec![(Ending::Complete, 3)]
        );
    }
}
