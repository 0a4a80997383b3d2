//! The agent's bookkeeping of model usage: every finished request goes into today's
//! [`Ledger`] (which the token budgets read) and its tokens into
//! `xpart_agent_tokens_total{principal, model_family, kind}`; at start the ledger is rebuilt
//! from today's lines in the agent's own audit files; `/status` shows it.
//!
//! The ledger lives in this agent's memory and its audit file only. An active/standby pair
//! does not share it: after a failover the standby counts from what its own audit files hold
//! (normally nothing of the active's traffic), so a principal may use up to its budgets once
//! more on the standby.

use std::collections::HashSet;
use std::fs::File;
use std::io::{BufRead, BufReader};
use std::path::{Path, PathBuf};
use std::sync::Mutex;
use std::time::{Duration, SystemTime};

use serde_json::{json, Value};
use xpart_bedrock::usage::Usage;
use xpart_daemon::audit::{AuditRecord, Service};

use crate::auth::Principals;
use crate::budget::{self, Budget, Ledger, OverBudget};
use crate::metrics::Metrics;

/// Most distinct `model_family` label values; later families are counted as `other`.
pub const MAX_MODEL_FAMILIES: usize = 32;

/// The `model_family` of a model id the family of which is not known.
pub const OTHER_FAMILY: &str = "other";

/// Model providers whose ids name a family (`anthropic.claude-…` → `anthropic.claude`); any
/// other id is counted as `other`, so callers cannot grow the label set.
const PROVIDERS: &[&str] = &[
    "ai21",
    "amazon",
    "anthropic",
    "cohere",
    "deepseek",
    "google",
    "luma",
    "meta",
    "minimax",
    "mistral",
    "moonshot",
    "nvidia",
    "openai",
    "qwen",
    "stability",
    "twelvelabs",
    "writer",
];

/// Inference-profile prefixes (`us.anthropic.…`) left out of the family.
const REGION_PREFIXES: &[&str] = &["us", "eu", "apac", "global", "us-gov", "jp", "au", "ca"];

/// Today's usage, the budgets' state, and the family labels handed out so far.
pub struct UsageBook {
    ledger: Mutex<Ledger>,
    families: Mutex<HashSet<String>>,
}

impl UsageBook {
    pub fn new(ledger: Ledger) -> UsageBook {
        UsageBook {
            ledger: Mutex::new(ledger),
            families: Mutex::new(HashSet::new()),
        }
    }

    /// Refuses a principal already at or over one of its budgets.
    pub fn admit(&self, principal: &str, budget: Budget) -> Result<(), OverBudget> {
        if budget == Budget::default() {
            return Ok(());
        }
        self.lock().admit(principal, budget, SystemTime::now())
    }

    /// Counts a finished request (its audit line as written): today's totals, the budgets,
    /// and the token counters.
    pub fn finished(&self, record: &AuditRecord, metrics: &Metrics) {
        let Some(principal) = record.principal.as_deref() else {
            return;
        };
        let usage = usage_of(record);
        self.lock()
            .record(principal, SystemTime::now(), record.status, &usage);
        if usage.is_empty() {
            return;
        }
        let family = self.family_label(record.model.as_ref().map(|m| m.as_str()));
        let kinds = [
            ("input", usage.input_tokens),
            ("output", usage.output_tokens),
            ("cache_read", usage.cache_read_tokens),
            ("cache_write", usage.cache_write_tokens),
        ];
        for (kind, count) in kinds {
            if let Some(count) = count {
                metrics
                    .tokens
                    .with_label_values(&[principal, family.as_str(), kind])
                    .inc_by(count);
            }
        }
    }

    /// `/status`'s `usage`: today's counts and budgets for each configured principal.
    pub fn status_json(&self, principals: &Principals) -> Value {
        let now = SystemTime::now();
        let ledger = self.lock();
        let list: Vec<Value> = principals
            .iter()
            .map(|p| {
                let today = ledger.today(&p.name, now);
                let budget = |limit: Option<u64>, used: u64| match limit {
                    Some(limit) => json!({ "used": used, "limit": limit }),
                    None => Value::Null,
                };
                json!({
                    "principal": p.name,
                    "requests": today.requests,
                    "errors": today.errors,
                    "input_tokens": today.input_tokens,
                    "output_tokens": today.output_tokens,
                    "cache_read_tokens": today.cache_read_tokens,
                    "cache_write_tokens": today.cache_write_tokens,
                    "tokens_per_minute": budget(p.budget.tokens_per_minute, ledger.minute_used(&p.name, now)),
                    "tokens_per_day": budget(p.budget.tokens_per_day, today.billable()),
                })
            })
            .collect();
        json!({ "day": budget::utc_date(now), "principals": list })
    }

    /// The `model_family` label of `model`: a known provider's family while fewer than
    /// [`MAX_MODEL_FAMILIES`] have been seen, else [`OTHER_FAMILY`].
    fn family_label(&self, model: Option<&str>) -> String {
        let Some(family) = model.and_then(model_family) else {
            return OTHER_FAMILY.to_owned();
        };
        let mut seen = self
            .families
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner());
        if seen.contains(&family) || seen.len() < MAX_MODEL_FAMILIES {
            seen.insert(family.clone());
            return family;
        }
        OTHER_FAMILY.to_owned()
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Ledger> {
        // The ledger holds plain counters: whatever a panicking holder left is still usable.
        self.ledger
            .lock()
            .unwrap_or_else(|poisoned| poisoned.into_inner())
    }
}

/// The usage an audit line records.
pub fn usage_of(record: &AuditRecord) -> Usage {
    Usage {
        input_tokens: record.input_tokens,
        output_tokens: record.output_tokens,
        cache_read_tokens: record.cache_read_tokens,
        cache_write_tokens: record.cache_write_tokens,
    }
}

/// A model id's family, `provider.name` (`anthropic.claude`, `amazon.titan`, `meta.llama3`):
/// the region prefix of an inference profile and an ARN's resource type are left out. `None`
/// when the provider is not one of [`PROVIDERS`] (an application inference profile's id, a
/// made-up id).
pub fn model_family(model: &str) -> Option<String> {
    let resource = model.rsplit('/').next().unwrap_or(model);
    let mut parts = resource.splitn(3, '.');
    let mut provider = parts.next()?;
    let mut rest = parts.next()?;
    if REGION_PREFIXES.contains(&provider) {
        provider = rest;
        rest = parts.next()?;
    }
    if !PROVIDERS.contains(&provider) {
        return None;
    }
    let name: String = rest
        .chars()
        .take_while(|c| c.is_ascii_lowercase() || c.is_ascii_digit())
        .take(32)
        .collect();
    if name.is_empty() {
        return None;
    }
    Some(format!("{provider}.{name}"))
}

/// What [`replay`] found.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Replayed {
    pub files: Vec<PathBuf>,
    /// Today's agent lines counted.
    pub lines: u64,
    /// Lines that were not audit records (a line cut off by a crash, say), skipped.
    pub unreadable: u64,
}

/// A ledger with the requests of the UTC day of `now` from the agent's audit file at `path`
/// and from its rotated copies in the same directory that were written to today (logrotate's
/// `delaycompress` leaves the last one uncompressed; compressed copies are not read, so a
/// day rotated twice by `maxsize` loses the earlier part). Each line is charged at the time
/// its answer ended (`time` + `latency_ms`). Missing or unreadable files are skipped with a
/// warning: a budget then starts from what could be read.
pub fn replay(path: &Path, now: SystemTime) -> (Ledger, Replayed) {
    let mut ledger = Ledger::new();
    let mut found = Replayed::default();
    let today = budget::utc_date(now);
    for file in files_of_today(path, &today) {
        let opened = match File::open(&file) {
            Ok(opened) => opened,
            Err(error) if error.kind() == std::io::ErrorKind::NotFound => continue,
            Err(error) => {
                tracing::warn!(file = %file.display(), %error, "audit file not read for today's token usage");
                continue;
            }
        };
        for line in BufReader::new(opened).lines() {
            let Ok(line) = line else {
                found.unreadable += 1;
                break;
            };
            // Lines start with their time: other days are skipped without parsing.
            if line.starts_with("{\"time\":\"") && !line[9..].starts_with(&today) {
                continue;
            }
            let Ok(record) = serde_json::from_str::<AuditRecord>(&line) else {
                found.unreadable += u64::from(!line.trim().is_empty());
                continue;
            };
            let (Service::Agent, Some(principal)) = (record.service, record.principal.as_deref())
            else {
                continue;
            };
            let Some(start) = budget::parse_audit_time(&record.time) else {
                found.unreadable += 1;
                continue;
            };
            let latency = Duration::try_from_secs_f64(record.latency_ms.max(0.0) / 1000.0)
                .unwrap_or(Duration::ZERO);
            ledger.record(
                principal,
                start + latency,
                record.status,
                &usage_of(&record),
            );
            found.lines += 1;
        }
        found.files.push(file);
    }
    (ledger, found)
}

/// The live file last, after its rotated copies modified today, oldest first.
fn files_of_today(path: &Path, today: &str) -> Vec<PathBuf> {
    let mut rotated: Vec<(SystemTime, PathBuf)> = Vec::new();
    let name = path.file_name().map(|n| n.to_string_lossy().into_owned());
    let dir = match path.parent() {
        Some(dir) if dir.as_os_str().is_empty() => Path::new("."),
        Some(dir) => dir,
        None => Path::new("."),
    };
    if let (Some(name), Ok(entries)) = (name, std::fs::read_dir(dir)) {
        for entry in entries.filter_map(Result::ok) {
            let candidate = entry.file_name().to_string_lossy().into_owned();
            let is_rotation = candidate.len() > name.len()
                && candidate.starts_with(&name)
                && !candidate.ends_with(".gz");
            let modified = entry.metadata().and_then(|m| m.modified()).ok();
            if let (true, Some(modified)) = (is_rotation, modified) {
                if budget::utc_date(modified).as_str() >= today {
                    rotated.push((modified, entry.path()));
                }
            }
        }
    }
    rotated.sort();
    let mut files: Vec<PathBuf> = rotated.into_iter().map(|(_, file)| file).collect();
    files.push(path.to_path_buf());
    files
}

#[cfg(test)]
mod tests {
    use super::*;
    use xpart_bedrock::ModelId;

    #[test]
    fn families_come_from_the_provider_and_the_first_word_of_the_name() {
        let known = [
            ("anthropic.claude-3-haiku-20240307-v1:0", "anthropic.claude"),
            ("us.anthropic.claude-sonnet-4-20250514-v1:0", "anthropic.claude"),
            ("us-gov.anthropic.claude-3-5-sonnet-20240620-v1:0", "anthropic.claude"),
            ("global.amazon.nova-pro-v1:0", "amazon.nova"),
            ("amazon.titan-text-express-v1", "amazon.titan"),
            ("meta.llama3-1-70b-instruct-v1:0", "meta.llama3"),
            ("arn:aws:bedrock:us-east-1::foundation-model/cohere.command-r-v1:0", "cohere.command"),
            ("arn:aws:bedrock:us-east-1:123456789012:inference-profile/eu.mistral.mistral-large-2407-v1:0", "mistral.mistral"),
        ];
        for (model, family) in known {
            assert_eq!(model_family(model).as_deref(), Some(family), "{model}");
        }
        let unknown = [
            "arn:aws:bedrock:us-east-1:123456789012:application-inference-profile/a1b2c3",
            "example.echo",
            "anthropic.",
            "anthropic",
            "us.nobody.model",
        ];
        for model in unknown {
            assert_eq!(model_family(model), None, "{model}");
        }
    }

    #[test]
    fn the_family_label_set_is_capped() {
        let book = UsageBook::new(Ledger::new());
        for n in 0..MAX_MODEL_FAMILIES {
            let model = format!("amazon.m{n}-v1");
            assert_eq!(book.family_label(Some(&model)), format!("amazon.m{n}"));
        }
        assert_eq!(book.family_label(Some("amazon.another-v1")), OTHER_FAMILY);
        assert_eq!(
            book.family_label(Some("amazon.m0-v2")),
            "amazon.m0",
            "seen before"
        );
        assert_eq!(book.family_label(None), OTHER_FAMILY);
    }

    #[test]
    fn finished_requests_count_tokens_by_principal_family_and_kind() {
        let book = UsageBook::new(Ledger::new());
        let metrics = Metrics::new();
        let mut record = AuditRecord::new(Service::Agent, "r1");
        record.principal = Some("lambda".into());
        record.model = Some(ModelId::new("us.anthropic.claude-3-haiku-20240307-v1:0"));
        record.status = 200;
        record.input_tokens = Some(10);
        record.output_tokens = Some(4);
        record.cache_read_tokens = Some(2);
        book.finished(&record, &metrics);
        book.finished(&record, &metrics);
        let count = |kind: &str| {
            metrics
                .tokens
                .with_label_values(&["lambda", "anthropic.claude", kind])
                .get()
        };
        assert_eq!(
            (
                count("input"),
                count("output"),
                count("cache_read"),
                count("cache_write")
            ),
            (20, 8, 4, 0)
        );
        let budget = Budget {
            tokens_per_minute: None,
            tokens_per_day: Some(28),
        };
        let refusal = book.admit("lambda", budget).expect_err("28 of 28 used");
        assert_eq!(refusal.used, 28);
    }

    fn line(time: &str, principal: &str, status: u16, tokens: Option<(u64, u64)>) -> String {
        let mut record = AuditRecord::new(Service::Agent, "r");
        record.time = time.into();
        record.principal = Some(principal.into());
        record.status = status;
        record.latency_ms = 1500.0;
        if let Some((input, output)) = tokens {
            record.input_tokens = Some(input);
            record.output_tokens = Some(output);
        }
        serde_json::to_string(&record).expect("serializable") + "\n"
    }

    #[test]
    fn replay_counts_todays_agent_lines_from_the_live_and_rotated_files() {
        let dir = std::env::temp_dir().join(format!("xpart-agent-replay-{}", std::process::id()));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).expect("scratch dir");
        let now = budget::parse_audit_time("2026-11-30T10:20:30.000Z").expect("time");
        let live = dir.join("audit.jsonl");
        let rotated = dir.join("audit.jsonl-20261130-1796020000");
        std::fs::write(
            &rotated,
            [
                line(
                    "2026-11-29T23:59:00.000Z",
                    "lambda",
                    200,
                    Some((1000, 1000)),
                ),
                line("2026-11-30T00:10:00.000Z", "lambda", 200, Some((5, 6))),
            ]
            .concat(),
        )
        .expect("write");
        let mut relay = AuditRecord::new(Service::Relay, "relay");
        relay.time = "2026-11-30T10:00:00.000Z".into();
        relay.principal = Some("lambda".into());
        relay.input_tokens = Some(999);
        std::fs::write(
            &live,
            [
                line("2026-11-30T10:20:00.000Z", "lambda", 200, Some((7, 8))),
                line("2026-11-30T10:20:01.000Z", "lambda", 429, None),
                "{\"time\":\"2026-11-30T10:20:02.0".to_owned() + "\n",
                serde_json::to_string(&relay).expect("serializable") + "\n",
                line("2026-11-30T10:20:03.000Z", "batch", 200, Some((1, 1))),
            ]
            .concat(),
        )
        .expect("write");
        File::options()
            .write(true)
            .open(&rotated)
            .and_then(|f| f.set_modified(now))
            .expect("rotated today");
        std::fs::write(
            dir.join("audit.jsonl-20261129-1795900000.gz"),
            b"\x1f\x8b not read",
        )
        .expect("write");
        let (ledger, found) = replay(&live, now);
        assert_eq!(found.files, vec![rotated, live.clone()]);
        assert_eq!((found.lines, found.unreadable), (4, 1));
        let lambda = ledger.today("lambda", now);
        assert_eq!((lambda.requests, lambda.errors), (3, 1));
        assert_eq!((lambda.input_tokens, lambda.output_tokens), (12, 14));
        assert_eq!(
            ledger.minute_used("lambda", now),
            15,
            "ended 10:20:01.5, in this minute"
        );
        assert_eq!(ledger.today("batch", now).billable(), 2);

        let (empty, found) = replay(&dir.join("missing.jsonl"), now);
        assert_eq!(found.lines, 0);
        assert_eq!(empty.today("lambda", now).requests, 0);
        let _ = std::fs::remove_dir_all(dir);
    }
}
