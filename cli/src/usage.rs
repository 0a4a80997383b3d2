//! `xpart usage`: who used what, from the audit files. Reads the daemons' JSON lines (the
//! live file, logrotate's rotated copies and their gzip-compressed forms), keeps the lines
//! inside `--since`/`--until`, and adds up requests, errors, refusals and model tokens per
//! principal, model and day (or any mix of them). With `--prices` each line's tokens are
//! priced by the model's entry, so a group's cost is exact even when the grouping hides the
//! model.
//!
//! Bad input never stops the report: a missing file, a truncated gzip stream or a line that
//! is not an audit record is reported on stderr as `file:line: what` and skipped. Only when
//! nothing at all could be read does the command fail (exit 2).

use std::collections::{BTreeMap, BTreeSet};
use std::fmt::Write as _;
use std::fs::File;
use std::io::{self, BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::ExitCode;

use clap::{Args, ValueEnum};
use serde::{Deserialize, Serialize};
use time::format_description::well_known::Rfc3339;
use time::{Date, OffsetDateTime, PrimitiveDateTime, Time, UtcOffset};

use crate::Error;

#[derive(Debug, Args)]
#[command(after_help = "\
Examples:
  xpart usage /var/log/xpart                       # every audit file there, rotated and .gz too
  xpart usage /var/log/xpart --since 2025-06-01 --until 2025-06-30 --by principal
  xpart usage '/var/log/xpart/audit.jsonl*' --by principal,model --prices prices.toml
  xpart usage audit.jsonl --by day --csv > usage.csv

Errors are answers with status >= 400, refusals included. Refusals are the 4xx answers xpart
gave itself: the agent never sent the request to a relay, or the relay never sent it to
Bedrock. Tokens come from the agent's lines (the answers' own usage figures); a line without
them adds requests but no tokens. Agent and relay lines describe the same requests: point the
command at one daemon's files or pick one with --service.")]
pub struct UsageArgs {
    /// Audit files, directories (every file whose name contains `.jsonl`) or glob patterns.
    #[arg(required = true, value_name = "PATH")]
    paths: Vec<String>,
    /// Only requests at or after this time: a UTC date (2025-06-01) or an RFC 3339 time.
    #[arg(long, value_name = "WHEN")]
    since: Option<String>,
    /// Only requests before this time; a date includes that whole UTC day.
    #[arg(long, value_name = "WHEN")]
    until: Option<String>,
    /// Group by these (repeatable or comma-separated; default principal,model,day).
    #[arg(long = "by", value_enum, value_delimiter = ',', value_name = "KEY")]
    by: Vec<Dimension>,
    /// Only lines written by this daemon.
    #[arg(long, value_enum)]
    service: Option<ServiceFilter>,
    /// Print CSV (a header and one row per group, then the total) instead of a table.
    #[arg(long)]
    csv: bool,
    /// Prices per 1,000 tokens by model pattern (TOML; see config/prices.example.toml); adds
    /// an estimated cost column.
    #[arg(long, value_name = "FILE")]
    prices: Option<PathBuf>,
}

/// What rows are grouped by.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, ValueEnum, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Dimension {
    Principal,
    Model,
    Day,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ServiceFilter {
    Agent,
    Relay,
}

pub fn run(args: UsageArgs, json: bool) -> Result<ExitCode, Error> {
    if json && args.csv {
        return Err(Error::Usage(
            "--json and --csv both choose the output: pick one".into(),
        ));
    }
    let query = Query::from_args(&args)?;
    let prices = match &args.prices {
        Some(path) => Some(PriceTable::load(path)?),
        None => None,
    };
    let mut warnings = Warnings::default();
    let files = find_files(&args.paths, &mut warnings);
    let mut report = Report::new(query.by.clone(), prices);
    let mut read_any = false;
    for file in &files {
        read_any |= report.read_file(file, &query, &mut warnings);
    }
    if !read_any {
        return Err(Error::Usage(format!(
            "no audit record could be read from {}",
            args.paths.join(", ")
        )));
    }
    if query.service.is_none() && report.services.len() > 1 {
        warnings.push(
            "both agent and relay lines were counted, so each request is counted twice: \
             use --service agent (tokens) or --service relay"
                .into(),
        );
    }
    for model in &report.unpriced {
        warnings.push(format!(
            "no price for model {model}: its groups have no cost; add a pattern to {}",
            args.prices
                .as_deref()
                .map(|p| p.display().to_string())
                .unwrap_or_default()
        ));
    }
    let output = if json {
        report.to_json(&files, &query, &warnings)
    } else if args.csv {
        report.to_csv()
    } else {
        report.to_table()
    };
    print!("{output}");
    Ok(ExitCode::SUCCESS)
}

/// The time window, the grouping and the service filter.
pub struct Query {
    since: Option<OffsetDateTime>,
    until: Option<OffsetDateTime>,
    by: Vec<Dimension>,
    service: Option<ServiceFilter>,
}

impl Query {
    fn from_args(args: &UsageArgs) -> Result<Query, Error> {
        let since = args
            .since
            .as_deref()
            .map(|text| parse_when(text, "--since", Bound::Start))
            .transpose()?;
        let until = args
            .until
            .as_deref()
            .map(|text| parse_when(text, "--until", Bound::End))
            .transpose()?;
        if let (Some(since), Some(until)) = (since, until) {
            if since >= until {
                return Err(Error::Usage(format!(
                    "--since {} is not before --until {}: swap them or widen the window",
                    args.since.as_deref().unwrap_or_default(),
                    args.until.as_deref().unwrap_or_default()
                )));
            }
        }
        let mut by = Vec::new();
        for dimension in &args.by {
            if !by.contains(dimension) {
                by.push(*dimension);
            }
        }
        if by.is_empty() {
            by = vec![Dimension::Principal, Dimension::Model, Dimension::Day];
        }
        Ok(Query {
            since,
            until,
            by,
            service: args.service,
        })
    }

    fn admits(&self, at: OffsetDateTime, service: Option<&str>) -> bool {
        let in_window =
            self.since.is_none_or(|since| at >= since) && self.until.is_none_or(|until| at < until);
        let wanted = match self.service {
            None => true,
            Some(ServiceFilter::Agent) => service == Some("agent"),
            Some(ServiceFilter::Relay) => service == Some("relay"),
        };
        in_window && wanted
    }
}

#[derive(Clone, Copy)]
enum Bound {
    Start,
    End,
}

/// A date is a whole UTC day: `--since` takes its start, `--until` the start of the next day.
fn parse_when(text: &str, flag: &str, bound: Bound) -> Result<OffsetDateTime, Error> {
    if let Ok(at) = OffsetDateTime::parse(text, &Rfc3339) {
        return Ok(at.to_offset(UtcOffset::UTC));
    }
    let date_format = time::macros::format_description!("[year]-[month]-[day]");
    let Ok(date) = Date::parse(text, date_format) else {
        return Err(Error::Usage(format!(
            "{flag} {text:?} is neither a date (2025-06-01) nor an RFC 3339 time \
             (2025-06-01T12:00:00Z)"
        )));
    };
    let day = match bound {
        Bound::Start => Some(date),
        Bound::End => date.next_day(),
    };
    let Some(day) = day else {
        return Err(Error::Usage(format!("{flag} {text:?} is out of range")));
    };
    Ok(PrimitiveDateTime::new(day, Time::MIDNIGHT).assume_utc())
}

/// Files named on the command line, found in directories and by globs, each once, in order.
fn find_files(paths: &[String], warnings: &mut Warnings) -> Vec<PathBuf> {
    let mut files = Vec::new();
    let push = |path: PathBuf, files: &mut Vec<PathBuf>| {
        if !files.contains(&path) {
            files.push(path);
        }
    };
    for arg in paths {
        let path = Path::new(arg);
        if path.is_dir() {
            for file in files_in_dir(path, warnings) {
                push(file, &mut files);
            }
            continue;
        }
        if path.exists() || !arg.contains(['*', '?', '[']) {
            push(path.to_path_buf(), &mut files);
            continue;
        }
        let Ok(matches) = glob::glob(arg) else {
            warnings.push(format!("{arg}: not a valid glob pattern; skipped"));
            continue;
        };
        let mut found: Vec<PathBuf> = matches.filter_map(Result::ok).collect();
        if found.is_empty() {
            warnings.push(format!("{arg}: no file matches; skipped"));
        }
        found.sort_by_key(|path| rotation_order(path));
        for file in found {
            if file.is_dir() {
                for inner in files_in_dir(&file, warnings) {
                    push(inner, &mut files);
                }
            } else {
                push(file, &mut files);
            }
        }
    }
    files
}

/// Audit files in a directory: the live `audit.jsonl` and its rotations (`audit.jsonl.1`,
/// `audit.jsonl-20250102-1735787045.gz`, ...).
fn files_in_dir(dir: &Path, warnings: &mut Warnings) -> Vec<PathBuf> {
    let entries = match std::fs::read_dir(dir) {
        Ok(entries) => entries,
        Err(err) => {
            warnings.push(format!("{}: {err}; skipped", dir.display()));
            return Vec::new();
        }
    };
    let mut files: Vec<PathBuf> = entries
        .filter_map(Result::ok)
        .map(|entry| entry.path())
        .filter(|path| path.is_file())
        .filter(|path| {
            path.file_name()
                .and_then(|name| name.to_str())
                .is_some_and(|name| name.contains(".jsonl"))
        })
        .collect();
    if files.is_empty() {
        warnings.push(format!(
            "{}: no audit file (a name containing .jsonl) in this directory",
            dir.display()
        ));
    }
    files.sort_by_key(|path| rotation_order(path));
    files
}

/// Oldest first, so output built from file order reads forward in time: numbered rotations
/// count down (`.3` before `.1`), dated ones up, and the live file comes last.
fn rotation_order(path: &Path) -> (String, i64, String) {
    let name = path
        .file_name()
        .map(|n| n.to_string_lossy().into_owned())
        .unwrap_or_default();
    let stem = name.strip_suffix(".gz").unwrap_or(&name);
    let (base, suffix) = match stem.find(".jsonl") {
        Some(at) => stem.split_at(at + ".jsonl".len()),
        None => (stem, ""),
    };
    let rank = match suffix.strip_prefix('.').map(str::parse::<i64>) {
        Some(Ok(number)) => -number,
        _ if suffix.is_empty() => i64::MAX,
        _ => 0,
    };
    (base.to_owned(), rank, suffix.to_owned())
}

/// Warnings go to stderr as they are found, and into the JSON report.
#[derive(Default)]
struct Warnings(Vec<String>);

impl Warnings {
    fn push(&mut self, warning: String) {
        eprintln!("warning: {warning}");
        self.0.push(warning);
    }
}

/// The fields of an audit line that usage needs (daemon/src/audit.rs `AuditRecord`); the rest
/// is ignored, so lines from older and newer daemons read alike.
#[derive(Debug, Deserialize)]
struct Line {
    time: String,
    #[serde(default)]
    service: Option<String>,
    #[serde(default)]
    principal: Option<String>,
    #[serde(default)]
    model: Option<String>,
    #[serde(default)]
    relay: Option<String>,
    status: u16,
    #[serde(default)]
    upstream_latency_ms: Option<f64>,
    #[serde(default)]
    input_tokens: Option<u64>,
    #[serde(default)]
    output_tokens: Option<u64>,
    #[serde(default)]
    cache_read_tokens: Option<u64>,
    #[serde(default)]
    cache_write_tokens: Option<u64>,
}

/// Status the relay records when the agent went away before the answer ended (nginx's 499).
const CLIENT_CLOSED: u16 = 499;

impl Line {
    fn is_error(&self) -> bool {
        self.status >= 400
    }

    /// A 4xx that xpart answered itself: never forwarded past the daemon that wrote the line.
    fn is_refusal(&self) -> bool {
        if !(400..500).contains(&self.status) || self.status == CLIENT_CLOSED {
            return false;
        }
        match self.service.as_deref() {
            Some("agent") => self.relay.is_none(),
            Some("relay") => self.upstream_latency_ms.is_none(),
            _ => false,
        }
    }
}

/// Sums for one group.
#[derive(Debug, Clone, Default, PartialEq, Serialize)]
pub struct Totals {
    pub requests: u64,
    pub errors: u64,
    pub refusals: u64,
    pub input_tokens: u64,
    pub output_tokens: u64,
    pub cache_read_tokens: u64,
    pub cache_write_tokens: u64,
    /// Estimated cost; `None` without `--prices` or when a model in the group has no price.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub cost: Option<f64>,
    #[serde(skip)]
    unpriced: bool,
}

impl Totals {
    fn add(&mut self, line: &Line, cost: Option<f64>) {
        self.requests += 1;
        self.errors += u64::from(line.is_error());
        self.refusals += u64::from(line.is_refusal());
        self.input_tokens += line.input_tokens.unwrap_or(0);
        self.output_tokens += line.output_tokens.unwrap_or(0);
        self.cache_read_tokens += line.cache_read_tokens.unwrap_or(0);
        self.cache_write_tokens += line.cache_write_tokens.unwrap_or(0);
        match cost {
            Some(cost) => self.cost = Some(self.cost.unwrap_or(0.0) + cost),
            None => self.unpriced = true,
        }
    }

    fn finished(mut self, priced: bool) -> Totals {
        if !priced || self.unpriced {
            self.cost = None;
        }
        self
    }
}

/// The totals so far, grouped by the query's dimensions.
pub struct Report {
    by: Vec<Dimension>,
    prices: Option<PriceTable>,
    groups: BTreeMap<Vec<String>, Totals>,
    total: Totals,
    services: BTreeSet<String>,
    unpriced: BTreeSet<String>,
    records: u64,
}

impl Report {
    fn new(by: Vec<Dimension>, prices: Option<PriceTable>) -> Report {
        Report {
            by,
            prices,
            groups: BTreeMap::new(),
            total: Totals::default(),
            services: BTreeSet::new(),
            unpriced: BTreeSet::new(),
            records: 0,
        }
    }

    /// Adds one file's lines; `false` when the file could not be opened at all.
    fn read_file(&mut self, path: &Path, query: &Query, warnings: &mut Warnings) -> bool {
        let reader = match open_audit_file(path) {
            Ok(reader) => reader,
            Err(err) => {
                warnings.push(format!("{}: {err}; skipped", path.display()));
                return false;
            }
        };
        self.read_lines(path, reader, query, warnings)
    }

    /// `true` when at least one line of the file was an audit record.
    fn read_lines(
        &mut self,
        path: &Path,
        mut reader: Box<dyn BufRead>,
        query: &Query,
        warnings: &mut Warnings,
    ) -> bool {
        let mut read_any = false;
        let mut buffer = Vec::new();
        let mut number = 0u64;
        loop {
            buffer.clear();
            number += 1;
            match reader.read_until(b'\n', &mut buffer) {
                Ok(0) => break,
                Ok(_) => {}
                Err(err) => {
                    warnings.push(format!(
                        "{}:{number}: {err}; the rest of the file is skipped",
                        path.display()
                    ));
                    break;
                }
            }
            let complete = buffer.last() == Some(&b'\n');
            let text = buffer.trim_ascii();
            if text.is_empty() {
                continue;
            }
            let line = match serde_json::from_slice::<Line>(text) {
                Ok(line) => line,
                Err(err) => {
                    let what = if complete {
                        format!("not an audit record ({err})")
                    } else {
                        "truncated line (no newline at the end of the file)".to_owned()
                    };
                    warnings.push(format!("{}:{number}: {what}; skipped", path.display()));
                    continue;
                }
            };
            let Ok(at) = OffsetDateTime::parse(&line.time, &Rfc3339) else {
                warnings.push(format!(
                    "{}:{number}: time {:?} is not RFC 3339; skipped",
                    path.display(),
                    line.time
                ));
                continue;
            };
            read_any = true;
            if query.admits(at, line.service.as_deref()) {
                self.add(&line, at);
            }
        }
        read_any
    }

    fn add(&mut self, line: &Line, at: OffsetDateTime) {
        self.records += 1;
        if let Some(service) = &line.service {
            self.services.insert(service.clone());
        }
        let model = line.model.as_deref().unwrap_or("-");
        let cost = match &self.prices {
            Some(prices) => match prices.cost(model, line) {
                Some(cost) => Some(cost),
                None => {
                    self.unpriced.insert(model.to_owned());
                    None
                }
            },
            None => None,
        };
        let key = self
            .by
            .iter()
            .map(|dimension| match dimension {
                Dimension::Principal => line.principal.as_deref().unwrap_or("-").to_owned(),
                Dimension::Model => model.to_owned(),
                Dimension::Day => at.date().to_string(),
            })
            .collect();
        self.groups.entry(key).or_default().add(line, cost);
        self.total.add(line, cost);
    }

    fn rows(&self) -> Vec<(Vec<String>, Totals)> {
        let priced = self.prices.is_some();
        self.groups
            .iter()
            .map(|(key, totals)| (key.clone(), totals.clone().finished(priced)))
            .collect()
    }

    fn total(&self) -> Totals {
        self.total.clone().finished(self.prices.is_some())
    }

    fn headers(&self) -> Vec<&'static str> {
        let mut headers: Vec<&'static str> = self
            .by
            .iter()
            .map(|dimension| match dimension {
                Dimension::Principal => "principal",
                Dimension::Model => "model",
                Dimension::Day => "day",
            })
            .collect();
        headers.extend([
            "requests",
            "errors",
            "refusals",
            "input_tokens",
            "output_tokens",
            "cache_read_tokens",
            "cache_write_tokens",
        ]);
        if self.prices.is_some() {
            headers.push("cost");
        }
        headers
    }

    fn cells(&self, key: &[String], totals: &Totals) -> Vec<String> {
        let mut cells = key.to_vec();
        cells.extend(
            [
                totals.requests,
                totals.errors,
                totals.refusals,
                totals.input_tokens,
                totals.output_tokens,
                totals.cache_read_tokens,
                totals.cache_write_tokens,
            ]
            .map(|n| n.to_string()),
        );
        if self.prices.is_some() {
            cells.push(totals.cost.map_or("-".to_owned(), format_cost));
        }
        cells
    }

    fn total_key(&self) -> Vec<String> {
        let mut key = vec![String::new(); self.by.len()];
        if let Some(first) = key.first_mut() {
            *first = "TOTAL".to_owned();
        }
        key
    }

    fn to_table(&self) -> String {
        let headers: Vec<String> = self.headers().iter().map(|h| h.to_uppercase()).collect();
        let mut rows: Vec<Vec<String>> = vec![headers];
        for (key, totals) in self.rows() {
            rows.push(self.cells(&key, &totals));
        }
        rows.push(self.cells(&self.total_key(), &self.total()));
        let columns = rows[0].len();
        let widths: Vec<usize> = (0..columns)
            .map(|c| rows.iter().map(|r| r[c].chars().count()).max().unwrap_or(0))
            .collect();
        let labels = self.by.len();
        let mut out = String::new();
        for row in &rows {
            let mut line = String::new();
            for (c, cell) in row.iter().enumerate() {
                if c > 0 {
                    line.push_str("  ");
                }
                if c < labels {
                    let _ = write!(line, "{cell:<width$}", width = widths[c]);
                } else {
                    let _ = write!(line, "{cell:>width$}", width = widths[c]);
                }
            }
            out.push_str(line.trim_end());
            out.push('\n');
        }
        if let Some(prices) = &self.prices {
            let _ = write!(out, "cost: estimated, {}", prices.currency);
            match &prices.source {
                Some(source) => {
                    let _ = writeln!(out, "; prices: {source}");
                }
                None => out.push('\n'),
            }
        }
        out
    }

    fn to_csv(&self) -> String {
        let mut out = String::new();
        let mut push_row = |cells: Vec<String>| {
            let quoted: Vec<String> = cells.iter().map(|cell| csv_field(cell)).collect();
            out.push_str(&quoted.join(","));
            out.push('\n');
        };
        push_row(self.headers().iter().map(|h| h.to_string()).collect());
        for (key, totals) in self.rows() {
            let mut cells = self.cells(&key, &totals);
            blank_missing_cost(&mut cells, &totals, self.prices.is_some());
            push_row(cells);
        }
        let total = self.total();
        let mut cells = self.cells(&self.total_key(), &total);
        blank_missing_cost(&mut cells, &total, self.prices.is_some());
        push_row(cells);
        out
    }

    fn to_json(&self, files: &[PathBuf], query: &Query, warnings: &Warnings) -> String {
        let rows: Vec<serde_json::Value> = self
            .rows()
            .into_iter()
            .map(|(key, totals)| {
                let mut row = serde_json::Map::new();
                for (dimension, value) in self.by.iter().zip(key) {
                    let name = match dimension {
                        Dimension::Principal => "principal",
                        Dimension::Model => "model",
                        Dimension::Day => "day",
                    };
                    row.insert(name.to_owned(), value.into());
                }
                if let Ok(serde_json::Value::Object(sums)) = serde_json::to_value(&totals) {
                    row.extend(sums);
                }
                serde_json::Value::Object(row)
            })
            .collect();
        let document = serde_json::json!({
            "files": files,
            "since": query.since.and_then(|at| at.format(&Rfc3339).ok()),
            "until": query.until.and_then(|at| at.format(&Rfc3339).ok()),
            "by": self.by,
            "records": self.records,
            "currency": self.prices.as_ref().map(|p| p.currency.clone()),
            "prices_source": self.prices.as_ref().and_then(|p| p.source.clone()),
            "rows": rows,
            "total": self.total(),
            "warnings": warnings.0,
        });
        format!("{document:#}\n")
    }
}

fn format_cost(cost: f64) -> String {
    format!("{cost:.6}")
}

fn blank_missing_cost(cells: &mut [String], totals: &Totals, priced: bool) {
    if priced && totals.cost.is_none() {
        if let Some(last) = cells.last_mut() {
            last.clear();
        }
    }
}

/// RFC 4180: a field with a comma, quote or line break is quoted, its quotes doubled.
fn csv_field(cell: &str) -> String {
    if cell.contains([',', '"', '\n', '\r']) {
        format!("\"{}\"", cell.replace('"', "\"\""))
    } else {
        cell.to_owned()
    }
}

/// The gzip magic number (RFC 1952, section 2.3.1).
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// A reader over the file's text, decompressing gzip whatever the file is called.
fn open_audit_file(path: &Path) -> io::Result<Box<dyn BufRead>> {
    let mut file = File::open(path)?;
    let mut magic = [0u8; 2];
    let mut got = 0;
    while got < magic.len() {
        let n = file.read(&mut magic[got..])?;
        if n == 0 {
            break;
        }
        got += n;
    }
    let head = io::Cursor::new(magic[..got].to_vec());
    let whole = head.chain(file);
    if got == magic.len() && magic == GZIP_MAGIC {
        return Ok(Box::new(BufReader::new(flate2::read::MultiGzDecoder::new(
            whole,
        ))));
    }
    Ok(Box::new(BufReader::new(whole)))
}

/// `--prices FILE`: price per 1,000 tokens by model pattern.
#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct PriceFile {
    #[serde(default = "default_currency")]
    currency: String,
    #[serde(default)]
    source: Option<String>,
    #[serde(default)]
    models: BTreeMap<String, Price>,
}

fn default_currency() -> String {
    "USD".to_owned()
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
struct Price {
    input_per_1k: f64,
    output_per_1k: f64,
    #[serde(default)]
    cache_read_per_1k: Option<f64>,
    #[serde(default)]
    cache_write_per_1k: Option<f64>,
}

pub struct PriceTable {
    currency: String,
    /// Where and when the prices were taken, as the file says.
    source: Option<String>,
    /// Most specific first: exact names, then patterns with more literal characters.
    entries: Vec<(String, Price)>,
}

/// A price file that cannot be used, naming what to fix.
#[derive(Debug, thiserror::Error)]
enum PriceError {
    #[error("{0}")]
    Toml(#[from] toml::de::Error),
    #[error("no [models.\"PATTERN\"] table: add one price per model pattern")]
    NoModels,
    #[error("models.\"{pattern}\".{field} = {value}: a price must be a finite number >= 0")]
    Negative {
        pattern: String,
        field: &'static str,
        value: f64,
    },
}

impl PriceTable {
    fn load(path: &Path) -> Result<PriceTable, Error> {
        let text =
            std::fs::read_to_string(path).map_err(|err| Error::file(path, err.to_string()))?;
        PriceTable::parse(&text).map_err(|error| Error::file(path, error.to_string()))
    }

    fn parse(text: &str) -> Result<PriceTable, PriceError> {
        let file: PriceFile = toml::from_str(text)?;
        if file.models.is_empty() {
            return Err(PriceError::NoModels);
        }
        for (pattern, price) in &file.models {
            let fields = [
                ("input_per_1k", Some(price.input_per_1k)),
                ("output_per_1k", Some(price.output_per_1k)),
                ("cache_read_per_1k", price.cache_read_per_1k),
                ("cache_write_per_1k", price.cache_write_per_1k),
            ];
            for (field, value) in fields {
                if let Some(value) = value {
                    if !value.is_finite() || value < 0.0 {
                        return Err(PriceError::Negative {
                            pattern: pattern.clone(),
                            field,
                            value,
                        });
                    }
                }
            }
        }
        let mut entries: Vec<(String, Price)> = file.models.into_iter().collect();
        entries.sort_by_key(|(pattern, _)| {
            let literal = pattern.chars().filter(|c| *c != '*').count();
            (pattern.contains('*'), std::cmp::Reverse(literal))
        });
        Ok(PriceTable {
            currency: file.currency,
            source: file.source,
            entries,
        })
    }

    fn price(&self, model: &str) -> Option<&Price> {
        self.entries
            .iter()
            .find(|(pattern, _)| xpart_bedrock::glob_match(pattern, model))
            .map(|(_, price)| price)
    }

    /// The line's cost, or `None` when it used tokens of a model without a price. Cache
    /// tokens without a cache price are charged as input tokens.
    fn cost(&self, model: &str, line: &Line) -> Option<f64> {
        let tokens = [
            line.input_tokens,
            line.output_tokens,
            line.cache_read_tokens,
            line.cache_write_tokens,
        ];
        let Some(price) = self.price(model) else {
            return tokens.iter().all(|t| t.unwrap_or(0) == 0).then_some(0.0);
        };
        let per_token =
            |count: Option<u64>, per_1k: f64| count.unwrap_or(0) as f64 * per_1k / 1000.0;
        Some(
            per_token(line.input_tokens, price.input_per_1k)
                + per_token(line.output_tokens, price.output_per_1k)
                + per_token(
                    line.cache_read_tokens,
                    price.cache_read_per_1k.unwrap_or(price.input_per_1k),
                )
                + per_token(
                    line.cache_write_tokens,
                    price.cache_write_per_1k.unwrap_or(price.input_per_1k),
                ),
        )
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::io::Write;
    use xpart_bedrock::{ModelId, Operation};
    use xpart_daemon::audit::{AuditRecord, Service};

    #[test]
    fn plain_rotated_and_gzip_files_add_up_exactly() {
        let report = fixture_report("fixture", Dimension::Principal, None);
        let rows = report.rows();
        assert_eq!(
            rows.iter().map(|(k, _)| k[0].as_str()).collect::<Vec<_>>(),
            ["-", "batch", "summarizer"]
        );
        let summarizer = &rows[2].1;
        assert_eq!(summarizer.requests, 4);
        assert_eq!(summarizer.errors, 1);
        assert_eq!(summarizer.refusals, 1);
        assert_eq!(summarizer.input_tokens, 1000 + 2000 + 500);
        assert_eq!(summarizer.output_tokens, 100 + 300 + 50);
        assert_eq!(summarizer.cache_read_tokens, 4000);
        assert_eq!(summarizer.cache_write_tokens, 0);
        let batch = &rows[1].1;
        assert_eq!(batch.requests, 2);
        assert_eq!(batch.errors, 1);
        assert_eq!(
            batch.refusals, 0,
            "a Bedrock 500 after forwarding is no refusal"
        );
        assert_eq!(batch.input_tokens, 10_000);
        assert_eq!(batch.output_tokens, 2000);
        assert_eq!(batch.cache_write_tokens, 1000);
        let unknown = &rows[0].1;
        assert_eq!(
            (unknown.requests, unknown.errors, unknown.refusals),
            (1, 1, 1)
        );
        assert_eq!(report.total().requests, 7);
        assert_eq!(report.total().input_tokens, 13_500);
    }

    #[test]
    fn costs_use_the_most_specific_price_and_cache_prices() {
        let prices = PriceTable::parse(PRICES).unwrap();
        let report = fixture_report("costs", Dimension::Model, Some(prices));
        let rows = report.rows();
        let by_model = by_first_key(&rows);
        // haiku: (1000+2000+500) in at 0.00025, (100+300+50) out at 0.00125, 4000 cache
        // read at 0.00003 (its own price).
        assert_close(
            by_model[HAIKU].cost.unwrap(),
            3.5 * 0.00025 + 0.45 * 0.00125 + 4.0 * 0.00003,
        );
        // sonnet: 10000 in at 0.003, 2000 out at 0.015, 1000 cache write charged at the
        // input price (no cache_write_per_1k given).
        assert_close(
            by_model[SONNET].cost.unwrap(),
            10.0 * 0.003 + 2.0 * 0.015 + 1.0 * 0.003,
        );
        // A refused request names no usage: zero cost even without a price.
        assert_eq!(by_model["-"].cost, Some(0.0));
        assert_close(
            report.total().cost.unwrap(),
            3.5 * 0.00025 + 0.45 * 0.00125 + 4.0 * 0.00003 + 0.063,
        );
    }

    #[test]
    fn a_model_with_usage_and_no_price_leaves_its_cost_unknown() {
        let prices = PriceTable::parse(
            "[models.\"anthropic.claude-3-haiku-*\"]\ninput_per_1k = 0.00025\noutput_per_1k = 0.00125\n",
        )
        .unwrap();
        let report = fixture_report("unpriced", Dimension::Model, Some(prices));
        let rows = report.rows();
        let by_model = by_first_key(&rows);
        assert_eq!(by_model[SONNET].cost, None);
        assert!(by_model[HAIKU].cost.is_some());
        assert_eq!(report.total().cost, None);
        assert_eq!(report.unpriced, BTreeSet::from([SONNET.to_owned()]));
    }

    #[test]
    fn window_and_day_grouping_use_utc_days() {
        let dir = Scratch::new("window");
        write_fixture(&dir);
        let args = vec![dir.0.display().to_string()];
        let query = Query {
            since: Some(parse_when("2025-06-02", "--since", Bound::Start).unwrap()),
            until: Some(parse_when("2025-06-02", "--until", Bound::End).unwrap()),
            by: vec![Dimension::Day],
            service: None,
        };
        let report = report_with(&args, query, None);
        let rows = report.rows();
        assert_eq!(rows.len(), 1);
        assert_eq!(rows[0].0, ["2025-06-02"]);
        assert_eq!(rows[0].1.requests, 3);
        // 2025-06-03T01:30:00+02:00 is 2025-06-02T23:30Z: inside the day.
        let late = parse_when("2025-06-03T01:30:00+02:00", "--since", Bound::Start).unwrap();
        assert_eq!(late.date().to_string(), "2025-06-02");
    }

    #[test]
    fn bad_lines_and_missing_files_are_warned_about_and_skipped() {
        let dir = Scratch::new("bad");
        let good = line(agent(
            "2025-06-01T10:00:00.000Z",
            Some("summarizer"),
            Some(HAIKU),
            200,
            Some((10, 5, 0, 0)),
        ));
        let path = dir.write(
            "audit.jsonl",
            format!("{good}\nnot json at all\n{{\"time\": 5}}\n{good}\n{{\"time\":\"2025-06-01T1")
                .as_bytes(),
        );
        let mut gz = gzip(format!("{good}\n{good}\n").as_bytes());
        gz.truncate(gz.len() - 12);
        let cut = dir.write("audit.jsonl.2.gz", &gz);
        let missing = dir.0.join("audit.jsonl.9");
        let mut warnings = Warnings::default();
        let files = find_files(
            &[
                path.display().to_string(),
                cut.display().to_string(),
                missing.display().to_string(),
            ],
            &mut warnings,
        );
        let mut report = Report::new(vec![Dimension::Principal], None);
        let query = Query {
            since: None,
            until: None,
            by: vec![Dimension::Principal],
            service: None,
        };
        let read: Vec<bool> = files
            .iter()
            .map(|file| report.read_file(file, &query, &mut warnings))
            .collect();
        assert_eq!(read, [true, true, false]);
        // The cut falls in the second line's compressed data: the first line counts, the
        // stream error is reported at line 2.
        assert_eq!(
            report.total().requests,
            3,
            "two plain and one from the cut gzip"
        );
        let text = warnings.0.join("\n");
        let name = path.display();
        let expected = [
            format!("{name}:2: not an audit record"),
            format!("{name}:3: not an audit record"),
            format!("{name}:5: truncated line"),
            format!("{}:2: incomplete deflate stream", cut.display()),
            format!("{}: No such file", missing.display()),
        ];
        for warning in &expected {
            assert!(text.contains(warning.as_str()), "{warning:?} not in {text}");
        }
        assert_eq!(warnings.0.len(), expected.len(), "{text}");
    }

    #[test]
    fn rotated_files_sort_oldest_first() {
        let mut names = vec![
            "audit.jsonl",
            "audit.jsonl.1",
            "audit.jsonl.2.gz",
            "audit.jsonl-20250602-1748822400",
            "audit.jsonl-20250601-1748736000.gz",
        ];
        names.sort_by_key(|n| rotation_order(Path::new(n)));
        assert_eq!(
            names,
            [
                "audit.jsonl.2.gz",
                "audit.jsonl.1",
                "audit.jsonl-20250601-1748736000.gz",
                "audit.jsonl-20250602-1748822400",
                "audit.jsonl",
            ]
        );
    }

    #[test]
    fn price_files_are_validated_naming_the_field() {
        let negative =
            PriceTable::parse("[models.\"x\"]\ninput_per_1k = -1.0\noutput_per_1k = 0.0\n")
                .err()
                .unwrap()
                .to_string();
        assert!(negative.contains("models.\"x\".input_per_1k"), "{negative}");
        let unknown = PriceTable::parse("[models.\"x\"]\ninput = 1.0\n")
            .err()
            .unwrap()
            .to_string();
        assert!(unknown.contains("unknown field `input`"), "{unknown}");
        assert!(PriceTable::parse("currency = \"USD\"\n").is_err());
    }

    #[test]
    fn the_shipped_example_prices_parse() {
        let text = include_str!("../../config/prices.example.toml");
        let table = PriceTable::parse(text).unwrap();
        assert!(table
            .price("anthropic.claude-3-haiku-20240307-v1:0")
            .is_some());
        assert!(table
            .price("us.anthropic.claude-3-5-sonnet-20241022-v2:0")
            .is_some());
    }

    #[test]
    fn csv_quotes_fields_that_need_it() {
        assert_eq!(csv_field("plain"), "plain");
        assert_eq!(csv_field("a,b"), "\"a,b\"");
        assert_eq!(csv_field("say \"hi\""), "\"say \"\"hi\"\"\"");
    }

    const HAIKU: &str = "anthropic.claude-3-haiku-20240307-v1:0";
    const SONNET: &str = "anthropic.claude-3-5-sonnet-20240620-v1:0";
    const PRICES: &str = r#"
currency = "USD"
[models."anthropic.claude-*"]
input_per_1k = 0.003
output_per_1k = 0.015
[models."anthropic.claude-3-haiku-*"]
input_per_1k = 0.00025
output_per_1k = 0.00125
cache_read_per_1k = 0.00003
"#;

    /// Seven agent lines over three files and two days, plus relay lines filtered by service:
    /// `audit.jsonl.2.gz` (oldest, gzip), `audit.jsonl.1` (rotated), `audit.jsonl` (live).
    fn write_fixture(dir: &Scratch) {
        let oldest = [
            agent(
                "2025-06-01T09:00:00.000Z",
                Some("summarizer"),
                Some(HAIKU),
                200,
                Some((1000, 100, 4000, 0)),
            ),
            agent(
                "2025-06-01T09:05:00.000Z",
                Some("batch"),
                Some(SONNET),
                200,
                Some((10_000, 2000, 0, 1000)),
            ),
        ];
        dir.write("audit.jsonl.2.gz", &gzip(lines(&oldest).as_bytes()));
        let mut refused = agent(
            "2025-06-01T23:59:59.999Z",
            Some("summarizer"),
            Some(HAIKU),
            429,
            None,
        );
        refused.error_type = Some("ThrottlingException".into());
        let mut failed = agent(
            "2025-06-02T00:00:00.000Z",
            Some("batch"),
            Some(SONNET),
            500,
            None,
        );
        failed.relay = Some("relay-a".into());
        failed.error_type = Some("InternalServerException".into());
        dir.write("audit.jsonl.1", lines(&[refused, failed]).as_bytes());
        let mut anonymous = agent("2025-06-02T08:00:00.000Z", None, None, 403, None);
        anonymous.error_type = Some("AccessDeniedException".into());
        let live = [
            agent(
                "2025-06-02T10:00:00.000Z",
                Some("summarizer"),
                Some(HAIKU),
                200,
                Some((2000, 300, 0, 0)),
            ),
            agent(
                "2025-06-03T10:00:00.000Z",
                Some("summarizer"),
                Some(HAIKU),
                200,
                Some((500, 50, 0, 0)),
            ),
            anonymous,
        ];
        dir.write("audit.jsonl", lines(&live).as_bytes());
        let mut relay = AuditRecord::new(Service::Relay, "relay-line");
        relay.time = "2025-06-01T09:00:00.010Z".into();
        relay.principal = Some("summarizer".into());
        relay.status = 200;
        dir.write("relay-audit.jsonl", format!("{}\n", line(relay)).as_bytes());
        dir.write("notes.txt", b"not an audit file, not read\n");
    }

    fn agent(
        time: &str,
        principal: Option<&str>,
        model: Option<&str>,
        status: u16,
        tokens: Option<(u64, u64, u64, u64)>,
    ) -> AuditRecord {
        let mut record = AuditRecord::new(Service::Agent, format!("req-{time}"));
        record.time = time.into();
        record.principal = principal.map(str::to_owned);
        record.operation = Some(Operation::Converse);
        record.model = model.map(ModelId::new);
        record.status = status;
        if status == 200 {
            record.relay = Some("relay-a".into());
        }
        if let Some((input, output, read, write)) = tokens {
            record.input_tokens = Some(input);
            record.output_tokens = Some(output);
            record.cache_read_tokens = Some(read);
            record.cache_write_tokens = Some(write);
        }
        record
    }

    fn line(record: AuditRecord) -> String {
        serde_json::to_string(&record).unwrap()
    }

    fn lines(records: &[AuditRecord]) -> String {
        records.iter().map(|r| line(r.clone()) + "\n").collect()
    }

    fn gzip(bytes: &[u8]) -> Vec<u8> {
        let mut encoder = flate2::write::GzEncoder::new(Vec::new(), flate2::Compression::default());
        encoder.write_all(bytes).unwrap();
        encoder.finish().unwrap()
    }

    /// The report over the fixture's audit files, grouped by one dimension.
    fn fixture_report(name: &str, by: Dimension, prices: Option<PriceTable>) -> Report {
        let dir = Scratch::new(name);
        write_fixture(&dir);
        report_for(&[dir.0.display().to_string()], &[by], prices)
    }

    fn by_first_key(rows: &[(Vec<String>, Totals)]) -> BTreeMap<&str, &Totals> {
        rows.iter().map(|(k, t)| (k[0].as_str(), t)).collect()
    }

    fn report_for(paths: &[String], by: &[Dimension], prices: Option<PriceTable>) -> Report {
        let query = Query {
            since: None,
            until: None,
            by: by.to_vec(),
            service: Some(ServiceFilter::Agent),
        };
        report_with(paths, query, prices)
    }

    fn report_with(paths: &[String], query: Query, prices: Option<PriceTable>) -> Report {
        let mut warnings = Warnings::default();
        let files = find_files(paths, &mut warnings);
        let mut report = Report::new(query.by.clone(), prices);
        for file in &files {
            report.read_file(file, &query, &mut warnings);
        }
        assert!(warnings.0.is_empty(), "{:?}", warnings.0);
        report
    }

    fn assert_close(actual: f64, expected: f64) {
        assert!((actual - expected).abs() < 1e-9, "{actual} != {expected}");
    }

    struct Scratch(PathBuf);

    impl Scratch {
        fn new(name: &str) -> Scratch {
            let dir =
                std::env::temp_dir().join(format!("xpart-usage-{name}-{}", std::process::id()));
            let _ = std::fs::remove_dir_all(&dir);
            std::fs::create_dir_all(&dir).unwrap();
            Scratch(dir)
        }

        fn write(&self, name: &str, bytes: &[u8]) -> PathBuf {
            let path = self.0.join(name);
            std::fs::write(&path, bytes).unwrap();
            path
        }
    }

    impl Drop for Scratch {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.0);
        }
    }
}
