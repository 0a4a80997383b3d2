//! Configuration problems reported all at once, each naming the file, the field, what is
//! wrong and how to fix it; and [`read_toml`], which turns TOML syntax and serde type errors
//! into such problems with the field path and the line and column.
//!
//! A daemon's config loader calls [`read_toml`] (or [`parse_toml`]) for the typed structs,
//! then validates the values, pushing every problem it finds onto one [`Diagnostics`], and
//! returns them together, so an operator fixes a file in one pass. Paths the file names are
//! taken relative to the file with [`resolve_path`].
//!
//! Custom `Deserialize` impls can carry a fix in their error message by separating it with
//! [`FIX_SEPARATOR`] (`" — fix: "`); [`read_toml`] splits it into the problem's `fix`.

use std::fmt;
use std::ops::Range;
use std::path::{Path, PathBuf};

use serde::de::DeserializeOwned;
use toml_edit::{ImDocument, Item, TableLike, Value};

/// Separates a problem from its fix in one-line messages.
pub const FIX_SEPARATOR: &str = " — fix: ";

/// One thing wrong with a configuration file.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Problem {
    /// The file as the operator named it.
    pub file: String,
    /// Where in the file, e.g. `[policy].operations[2]` or `[[relay]][0].endpoint`; empty
    /// when the problem concerns the whole file.
    pub field: String,
    /// What is wrong, in the operator's terms.
    pub message: String,
    /// What to do about it.
    pub fix: String,
    /// Line and column (1-based) when known.
    pub location: Option<Location>,
}

/// A 1-based line and column (in characters) in a configuration file.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub line: usize,
    pub column: usize,
}

impl fmt::Display for Problem {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&self.file)?;
        if let Some(location) = self.location {
            write!(f, ":{}:{}", location.line, location.column)?;
        }
        if !self.field.is_empty() {
            write!(f, ": {}", self.field)?;
        }
        write!(f, ": {}{FIX_SEPARATOR}{}", self.message, self.fix)
    }
}

/// Every problem found in one configuration file, and the warnings about things that still
/// load but should change (an old field name).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diagnostics {
    file: String,
    problems: Vec<Problem>,
    warnings: Vec<Problem>,
}

impl Diagnostics {
    /// An empty collection for `file` (the name the operator gave, used in every line).
    pub fn new(file: impl Into<String>) -> Diagnostics {
        Diagnostics {
            file: file.into(),
            problems: Vec::new(),
            warnings: Vec::new(),
        }
    }

    pub fn file(&self) -> &str {
        &self.file
    }

    /// Record a problem in this file.
    pub fn push(
        &mut self,
        field: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.problems.push(self.problem(field, message, fix));
    }

    /// Record a problem built elsewhere (it keeps its own file name).
    pub fn push_problem(&mut self, problem: Problem) {
        self.problems.push(problem);
    }

    /// Record something that loads but should change; it does not make the file invalid.
    pub fn warn(
        &mut self,
        field: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) {
        self.warnings.push(self.problem(field, message, fix));
    }

    fn problem(
        &self,
        field: impl Into<String>,
        message: impl Into<String>,
        fix: impl Into<String>,
    ) -> Problem {
        Problem {
            file: self.file.clone(),
            field: field.into(),
            message: message.into(),
            fix: fix.into(),
            location: None,
        }
    }

    /// Take over every problem and warning of `other`.
    pub fn extend(&mut self, other: Diagnostics) {
        self.problems.extend(other.problems);
        self.warnings.extend(other.warnings);
    }

    pub fn is_empty(&self) -> bool {
        self.problems.is_empty()
    }

    pub fn len(&self) -> usize {
        self.problems.len()
    }

    pub fn problems(&self) -> &[Problem] {
        &self.problems
    }

    pub fn warnings(&self) -> &[Problem] {
        &self.warnings
    }

    /// Fill in the line and column of problems that have none, from the file's text,
    /// for fields written the way this module writes them (`[policy].operations[2]`,
    /// `[[relay]][0].endpoint`). Fields that are not in the text stay without a location.
    pub fn locate_in(&mut self, text: &str) {
        let Ok(document) = ImDocument::parse(text) else {
            return;
        };
        for problem in self.problems.iter_mut().chain(&mut self.warnings) {
            if problem.location.is_some() {
                continue;
            }
            let Some(steps) = parse_field(&problem.field) else {
                continue;
            };
            problem.location =
                locate(&document, &steps).and_then(|span| location(text, span.start));
        }
    }

    /// `Ok(value)` when nothing was recorded, else these diagnostics.
    pub fn into_result<T>(self, value: T) -> Result<T, Diagnostics> {
        if self.problems.is_empty() {
            return Ok(value);
        }
        Err(self)
    }
}

impl fmt::Display for Diagnostics {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        for (i, problem) in self.problems.iter().enumerate() {
            if i > 0 {
                f.write_str("\n")?;
            }
            write!(f, "{problem}")?;
        }
        for (i, warning) in self.warnings.iter().enumerate() {
            if i > 0 || !self.problems.is_empty() {
                f.write_str("\n")?;
            }
            write!(f, "{WARNING_PREFIX}{warning}")?;
        }
        Ok(())
    }
}

/// Starts a warning's line wherever warnings are printed beside problems.
pub const WARNING_PREFIX: &str = "warning: ";

/// A loaded configuration that may carry warnings (see [`Diagnostics::warn`]), which the
/// daemon logs when it loads the file and `--check` and `xpart config check` print.
pub trait Warned {
    fn warnings(&self) -> &[Problem];
}

/// Log each warning of a loaded file, with its file, field and fix.
pub fn log_warnings(warnings: &[Problem]) {
    for warning in warnings {
        tracing::warn!(
            file = %warning.file,
            field = %warning.field,
            fix = %warning.fix,
            "configuration warning: {warning}"
        );
    }
}

/// A field whose name changed. The old name still loads (the field carries
/// `#[serde(alias = "old")]`); [`renamed_fields`] warns about it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Renamed {
    /// The top-level table (or array of tables) the field is in, e.g. `"health"`.
    pub table: &'static str,
    pub old: &'static str,
    pub new: &'static str,
}

/// A warning for each old name in `text` that names its new one, and a problem for each
/// table that has both (serde would only say "duplicate field"). Text that is not TOML gives
/// nothing: deserialization reports it.
pub fn renamed_fields(text: &str, file: &str, renamed: &[Renamed]) -> Diagnostics {
    let mut found = Diagnostics::new(file);
    let Ok(document) = ImDocument::parse(text) else {
        return found;
    };
    for rename in renamed {
        let Some(item) = document.get(rename.table) else {
            continue;
        };
        let tables: Vec<(String, &dyn TableLike)> = match item {
            Item::ArrayOfTables(array) => array
                .iter()
                .enumerate()
                .map(|(i, table)| {
                    (
                        format!("[[{}]][{i}]", rename.table),
                        table as &dyn TableLike,
                    )
                })
                .collect(),
            other => match other.as_table_like() {
                Some(table) => vec![(format!("[{}]", rename.table), table)],
                None => Vec::new(),
            },
        };
        for (name, table) in tables {
            let has_old = table.contains_key(rename.old);
            let has_new = table.contains_key(rename.new);
            let (old, new) = (rename.old, rename.new);
            match (has_old, has_new) {
                (true, true) => found.push(
                    format!("{name}.{old}"),
                    format!("both {old} (its old name) and {new} are set"),
                    format!("keep only {new}"),
                ),
                (true, false) => found.warn(
                    format!("{name}.{old}"),
                    format!("{old} is deprecated; it is now called {new}"),
                    format!("rename {old} to {new}"),
                ),
                (false, _) => {}
            }
        }
    }
    found.locate_in(text);
    found
}

impl std::error::Error for Diagnostics {}

/// Read and deserialize a TOML file. Problems name the file as `path` is displayed.
pub fn read_toml<T: DeserializeOwned>(path: impl AsRef<Path>) -> Result<T, Diagnostics> {
    let path = path.as_ref();
    let text = read_text(path)?;
    parse_toml(&text, &path.display().to_string())
}

/// A configuration file's text; a file that cannot be read is a problem naming it as `path`
/// is displayed, with what to do.
pub fn read_text(path: &Path) -> Result<String, Diagnostics> {
    let label = path.display().to_string();
    match std::fs::read_to_string(path) {
        Ok(text) => Ok(text),
        Err(err) => {
            let mut diagnostics = Diagnostics::new(&label);
            let fix = match err.kind() {
                std::io::ErrorKind::NotFound => "check the path given to --config",
                std::io::ErrorKind::PermissionDenied => {
                    "make the file readable by the daemon's user"
                }
                _ => "make the path a readable UTF-8 text file",
            };
            diagnostics.push("", format!("cannot read the file: {err}"), fix);
            Err(diagnostics)
        }
    }
}

/// Deserialize TOML text; `file` is the name used in problems.
///
/// Keys that `T` does not use are problems too (whether or not `T` denies unknown fields),
/// as is the first type or syntax error, which stops deserialization.
pub fn parse_toml<T: DeserializeOwned>(text: &str, file: &str) -> Result<T, Diagnostics> {
    let mut diagnostics = Diagnostics::new(file);
    // Only used for naming and locating fields; when it fails, the deserializer reports
    // the same syntax error with its position.
    let document = ImDocument::parse(text).ok();
    let mut ignored: Vec<Vec<Step>> = Vec::new();
    let mut on_ignored = |path: serde_ignored::Path<'_>| ignored.push(ignored_steps(&path));
    let deserializer =
        serde_ignored::Deserializer::new(toml::Deserializer::new(text), &mut on_ignored);
    let result: Result<T, _> = serde_path_to_error::deserialize(deserializer);
    for steps in ignored {
        let name = match steps.last() {
            Some(Step::Key(name)) => name.clone(),
            _ => String::new(),
        };
        let span = document.as_ref().and_then(|doc| locate(doc, &steps));
        diagnostics.push_problem(Problem {
            file: file.to_string(),
            field: field_name(document.as_ref(), &steps),
            message: format!("unknown field \"{name}\""),
            fix: "remove it, or check its spelling and the table it is in (see the example config)"
                .to_string(),
            location: span.and_then(|span| location(text, span.start)),
        });
    }
    match result {
        Ok(value) => diagnostics.into_result(value),
        Err(err) => {
            diagnostics.push_problem(serde_problem(text, file, document.as_ref(), &err));
            Err(diagnostics)
        }
    }
}

/// `path` as written in `config_file`. A relative path is taken relative to the file's
/// directory, so that a config and the keys and certificates it names can move together.
pub fn resolve_path(config_file: &Path, path: &Path) -> PathBuf {
    match config_file.parent() {
        Some(dir) if path.is_relative() => dir.join(path),
        _ => path.to_owned(),
    }
}

/// One step of a field path: a table key or an array index.
#[derive(Debug, Clone, PartialEq, Eq)]
enum Step {
    Key(String),
    Index(usize),
}

fn ignored_steps(path: &serde_ignored::Path<'_>) -> Vec<Step> {
    let mut steps = Vec::new();
    let mut current = path;
    loop {
        match current {
            serde_ignored::Path::Root => break,
            serde_ignored::Path::Seq { parent, index } => {
                steps.push(Step::Index(*index));
                current = parent;
            }
            serde_ignored::Path::Map { parent, key } => {
                steps.push(Step::Key(key.clone()));
                current = parent;
            }
            serde_ignored::Path::Some { parent } => current = parent,
            serde_ignored::Path::NewtypeStruct { parent } => current = parent,
            serde_ignored::Path::NewtypeVariant { parent } => current = parent,
        }
    }
    steps.reverse();
    steps
}

fn serde_problem(
    text: &str,
    file: &str,
    document: Option<&ImDocument<&str>>,
    err: &serde_path_to_error::Error<toml::de::Error>,
) -> Problem {
    let mut steps: Vec<Step> = err
        .path()
        .iter()
        .filter_map(|segment| match segment {
            serde_path_to_error::Segment::Seq { index } => Some(Step::Index(*index)),
            serde_path_to_error::Segment::Map { key } => Some(Step::Key(key.clone())),
            serde_path_to_error::Segment::Enum { .. } => None,
            serde_path_to_error::Segment::Unknown => None,
        })
        .collect();
    let raw = err.inner().message().trim();
    let explained = explain(raw);
    if let Some(name) = &explained.field {
        if steps.last() != Some(&Step::Key(name.clone())) {
            steps.push(Step::Key(name.clone()));
        }
    }
    let span = err
        .inner()
        .span()
        .or_else(|| document.and_then(|doc| locate(doc, &steps)));
    let field = field_name(document, &steps);
    let fix = match explained.fix {
        Some(fix) => fix,
        None if steps.is_empty() => "correct the TOML syntax there".to_string(),
        None => "correct the value (see the example config for its format)".to_string(),
    };
    let fix = match (&explained.kind, steps.split_last()) {
        (Explained::Missing, Some((Step::Key(name), []))) => {
            format!("add `{name} = …` or a [{name}] table (see the example config)")
        }
        (Explained::Missing, Some((Step::Key(name), parent))) => format!(
            "add `{name} = …` to {} (see the example config)",
            field_name(document, parent)
        ),
        _ => fix,
    };
    Problem {
        file: file.to_string(),
        field,
        message: explained.message,
        fix,
        location: span.and_then(|span| location(text, span.start)),
    }
}

#[derive(Debug, PartialEq, Eq)]
enum Explained {
    Missing,
    Other,
}

struct Explanation {
    kind: Explained,
    /// The field the message is about, when serde names it rather than the path.
    field: Option<String>,
    message: String,
    fix: Option<String>,
}

/// Turn serde's and toml's messages into the operator's terms.
fn explain(raw: &str) -> Explanation {
    let flat = raw
        .lines()
        .map(str::trim)
        .filter(|line| !line.is_empty())
        .collect::<Vec<_>>()
        .join("; ");
    if let Some((message, fix)) = flat.split_once(FIX_SEPARATOR) {
        return Explanation {
            kind: Explained::Other,
            field: None,
            message: message.to_string(),
            fix: Some(fix.to_string()),
        };
    }
    let names = backticked(&flat);
    if flat.starts_with("missing field ") {
        return Explanation {
            kind: Explained::Missing,
            field: names.first().map(|name| name.to_string()),
            message: "required field is missing".to_string(),
            fix: None,
        };
    }
    if flat.starts_with("unknown field ") {
        let expected = names.get(1..).unwrap_or_default();
        let fix = if expected.is_empty() {
            "remove it: this table takes no fields".to_string()
        } else {
            format!("remove it, or use one of: {}", expected.join(", "))
        };
        return Explanation {
            kind: Explained::Other,
            field: names.first().map(|name| name.to_string()),
            message: format!("unknown field \"{}\"", names.first().unwrap_or(&"")),
            fix: Some(fix),
        };
    }
    if flat.starts_with("unknown variant ") {
        let expected = names.get(1..).unwrap_or_default();
        return Explanation {
            kind: Explained::Other,
            field: None,
            message: format!("unknown value \"{}\"", names.first().unwrap_or(&"")),
            fix: Some(format!("use one of: {}", expected.join(", "))),
        };
    }
    // serde's `invalid type: FOUND, expected EXPECTED` and its `invalid value: …` twin.
    for (prefix, problem) in [
        ("invalid type: ", "wrong type"),
        ("invalid value: ", "invalid value"),
    ] {
        if let Some((found, expected)) = flat
            .strip_prefix(prefix)
            .and_then(|rest| rest.split_once(", expected "))
        {
            let expected = toml_terms(expected);
            return Explanation {
                kind: Explained::Other,
                field: None,
                message: format!("{problem}: found {found}, expected {}", short(&expected)),
                fix: Some(format!("give {expected}")),
            };
        }
    }
    Explanation {
        kind: Explained::Other,
        field: None,
        message: flat,
        fix: None,
    }
}

/// Serde's names for expected types, in the words of a TOML file.
fn toml_terms(expected: &str) -> String {
    let term = match expected {
        "u8" => "a whole number from 0 to 255",
        "u16" => "a whole number from 0 to 65535",
        "u32" => "a whole number from 0 to 4294967295",
        "u64" | "usize" => "a whole number of 0 or more",
        "i8" | "i16" | "i32" | "i64" | "isize" => "a whole number",
        "f32" | "f64" => "a number",
        "a boolean" => "true or false",
        "a string" => "a quoted string",
        "a sequence" => "a list, e.g. [\"a\", \"b\"]",
        "a map" => "a table",
        other if other.starts_with("struct ") => "a table",
        other => other,
    };
    term.to_string()
}

/// A term without its example, for the message (the fix keeps the example).
fn short(term: &str) -> &str {
    term.split(", e.g.").next().unwrap_or(term)
}

/// The texts between pairs of backticks, in order.
fn backticked(text: &str) -> Vec<&str> {
    text.split('`').skip(1).step_by(2).collect()
}

/// Read back a field name written by [`field_name`] (or by hand in the same form).
fn parse_field(field: &str) -> Option<Vec<Step>> {
    let mut steps = Vec::new();
    let mut rest = field;
    if let Some(inner) = rest.strip_prefix("[[") {
        let (name, after) = inner.split_once("]]")?;
        steps.push(Step::Key(name.to_string()));
        rest = after;
    } else if let Some(inner) = rest.strip_prefix('[') {
        let (name, after) = inner.split_once(']')?;
        steps.push(Step::Key(name.to_string()));
        rest = after;
    }
    while !rest.is_empty() {
        if let Some(inner) = rest.strip_prefix('[') {
            let (index, after) = inner.split_once(']')?;
            steps.push(Step::Index(index.parse().ok()?));
            rest = after;
            continue;
        }
        let key_text = rest.strip_prefix('.').unwrap_or(rest);
        let end = key_text.find(['.', '[']).unwrap_or(key_text.len());
        if end == 0 {
            return None;
        }
        steps.push(Step::Key(key_text[..end].to_string()));
        rest = &key_text[end..];
    }
    if steps.is_empty() {
        return None;
    }
    Some(steps)
}

/// Render a path the way the operator sees it in the file: `[table].key`,
/// `[[array]][1].key`, `key[2]`.
fn field_name(document: Option<&ImDocument<&str>>, steps: &[Step]) -> String {
    let mut name = String::new();
    for (i, step) in steps.iter().enumerate() {
        match (i, step) {
            (0, Step::Key(key)) => {
                let root = document.and_then(|doc| doc.as_table().get(key));
                let more = steps.len() > 1;
                match root {
                    Some(Item::ArrayOfTables(_)) => name.push_str(&format!("[[{key}]]")),
                    Some(Item::Table(_)) => name.push_str(&format!("[{key}]")),
                    Some(_) => name.push_str(key),
                    None if more => name.push_str(&format!("[{key}]")),
                    None => name.push_str(key),
                }
            }
            (_, Step::Key(key)) => {
                if !name.is_empty() {
                    name.push('.');
                }
                name.push_str(key);
            }
            (_, Step::Index(index)) => name.push_str(&format!("[{index}]")),
        }
    }
    name
}

/// The byte span of the last step of `steps` in the document, when it exists there.
fn locate(document: &ImDocument<&str>, steps: &[Step]) -> Option<Range<usize>> {
    enum Node<'a> {
        Table(&'a dyn TableLike),
        Item(&'a Item),
        Value(&'a Value),
    }
    let mut node = Node::Table(document.as_table());
    let mut span = None;
    for step in steps {
        let next = match (step, &node) {
            (Step::Key(key), node) => {
                let table: &dyn TableLike = match node {
                    Node::Table(table) => *table,
                    Node::Item(item) => item.as_table_like()?,
                    Node::Value(value) => value.as_inline_table()?,
                };
                let (found_key, item) = table.get_key_value(key)?;
                span = found_key.span().or(span);
                Node::Item(item)
            }
            (Step::Index(index), Node::Item(Item::ArrayOfTables(tables))) => {
                let table = tables.get(*index)?;
                span = table.span().or(span);
                Node::Table(table)
            }
            (Step::Index(index), Node::Item(Item::Value(Value::Array(array))))
            | (Step::Index(index), Node::Value(Value::Array(array))) => {
                let value = array.get(*index)?;
                span = value.span().or(span);
                Node::Value(value)
            }
            (Step::Index(_), _) => return span,
        };
        node = next;
    }
    span
}

fn location(text: &str, offset: usize) -> Option<Location> {
    let before = text.get(..offset)?;
    let line_start = before.rfind('\n').map_or(0, |at| at + 1);
    Some(Location {
        line: before.matches('\n').count() + 1,
        column: before[line_start..].chars().count() + 1,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    const RENAMED: &[Renamed] = &[Renamed {
        table: "health",
        old: "max_age_s",
        new: "max_age_secs",
    }];

    #[test]
    fn an_old_field_name_is_a_warning_naming_the_new_one_with_its_line() {
        let found = renamed_fields("[health]\nmax_age_s = 5\n", "agent.toml", RENAMED);

        assert!(found.is_empty());
        let [warning] = found.warnings() else {
            panic!("one warning expected: {found:?}");
        };
        assert_eq!(warning.field, "[health].max_age_s");
        assert!(warning.message.contains("max_age_secs"), "{warning}");
        assert_eq!(warning.fix, "rename max_age_s to max_age_secs");
        assert_eq!(warning.location, Some(Location { line: 2, column: 1 }));
    }

    #[test]
    fn the_new_field_name_gives_no_warning() {
        let found = renamed_fields("[health]\nmax_age_secs = 5\n", "agent.toml", RENAMED);

        assert!(found.is_empty());
        assert!(found.warnings().is_empty());
    }

    #[test]
    fn both_names_in_one_table_is_a_problem() {
        let text = "[health]\nmax_age_s = 5\nmax_age_secs = 6\n";

        let found = renamed_fields(text, "agent.toml", RENAMED);

        let [problem] = found.problems() else {
            panic!("one problem expected: {found:?}");
        };
        assert_eq!(problem.field, "[health].max_age_s");
        assert_eq!(problem.fix, "keep only max_age_secs");
    }

    #[test]
    fn old_names_are_found_in_each_table_of_an_array() {
        let renamed = [Renamed {
            table: "relay",
            old: "a_s",
            new: "a_secs",
        }];
        let text = "[[relay]]\nname = \"x\"\n[[relay]]\na_s = 1\n";

        let found = renamed_fields(text, "agent.toml", &renamed);

        let fields: Vec<&str> = found.warnings().iter().map(|w| w.field.as_str()).collect();
        assert_eq!(fields, ["[[relay]][1].a_s"]);
    }

    #[test]
    fn warnings_print_after_problems_marked_as_warnings() {
        let mut diagnostics = Diagnostics::new("agent.toml");
        diagnostics.warn("[health].a_s", "old", "rename");
        diagnostics.push("[front].listen", "bad", "fix it");

        let text = diagnostics.to_string();

        assert_eq!(
            text,
            "agent.toml: [front].listen: bad — fix: fix it\nwarning: agent.toml: [health].a_s: old — fix: rename"
        );
        assert!(diagnostics.into_result(()).is_err());
    }

    #[test]
    fn relative_paths_resolve_against_the_config_files_directory() {
        let file = Path::new("/etc/xpart/agent.toml");
        assert_eq!(
            resolve_path(file, Path::new("keys/agent.key")),
            Path::new("/etc/xpart/keys/agent.key")
        );
        assert_eq!(
            resolve_path(file, Path::new("/var/lib/xpart/agent.key")),
            Path::new("/var/lib/xpart/agent.key")
        );
        assert_eq!(
            resolve_path(Path::new("agent.toml"), Path::new("agent.key")),
            Path::new("agent.key")
        );
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Loose {
        tunnel: Tunnel,
        #[serde(default)]
        relay: Vec<Relay>,
        policy: Option<Policy>,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Tunnel {
        address: String,
        #[serde(default)]
        mtu: Option<u16>,
        #[serde(default)]
        mode: Option<Mode>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(rename_all = "lowercase")]
    enum Mode {
        Kernel,
        Userspace,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Relay {
        name: String,
        service_port: u16,
    }

    #[derive(Debug, Deserialize)]
    #[allow(dead_code)]
    struct Policy {
        operations: Vec<xpart_bedrock::Operation>,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct Strict {
        admin: StrictAdmin,
    }

    #[derive(Debug, Deserialize)]
    #[serde(deny_unknown_fields)]
    #[allow(dead_code)]
    struct StrictAdmin {
        listen: String,
        token: Option<String>,
    }

    /// The one problem `text` has.
    fn sole_problem(text: &str, file: &str) -> Problem {
        let err = parse_toml::<Loose>(text, file).unwrap_err();
        assert_eq!(err.len(), 1, "{err}");
        err.problems()[0].clone()
    }

    /// The first problem in agent.toml `text` is `field`: `message`, with `fix`.
    #[track_caller]
    fn assert_explained(text: &str, field: &str, message: &str, fix: &str) {
        let problem = first_problem(text, "agent.toml");
        let got = (problem.field.as_str(), problem.message.as_str());
        assert_eq!((got, problem.fix.as_str()), ((field, message), fix));
    }

    /// The first problem `text` has.
    fn first_problem(text: &str, file: &str) -> Problem {
        let err = parse_toml::<Loose>(text, file).unwrap_err();
        err.problems()[0].clone()
    }

    #[test]
    fn valid_file_parses() {
        let text = "[tunnel]\naddress = \"100.64.0.1/30\"\nmtu = 1420\n\n[[relay]]\nname = \"a\"\nservice_port = 8080\n";
        let config: Loose = parse_toml(text, "agent.toml").unwrap();
        assert_eq!(config.tunnel.mtu, Some(1420));
        assert_eq!(config.relay.len(), 1);
    }

    #[test]
    fn type_error_names_field_line_and_column() {
        let text = "[tunnel]\naddress = \"x\"\nmtu = \"big\"\n";
        let problem = sole_problem(text, "agent.toml");
        assert_eq!(problem.field, "[tunnel].mtu");
        assert_eq!(problem.location, Some(Location { line: 3, column: 7 }));
        assert_eq!(
            problem.message,
            "wrong type: found string \"big\", expected a whole number from 0 to 65535"
        );
        assert_eq!(problem.fix, "give a whole number from 0 to 65535");
        assert!(
            problem
                .to_string()
                .starts_with("agent.toml:3:7: [tunnel].mtu: wrong type"),
            "{problem}"
        );
    }

    #[test]
    fn several_unknown_fields_and_a_type_error_are_reported_together() {
        let text = "[tunnel]\naddress = \"x\"\nadress = \"typo\"\n\n[[relay]]\nname = \"a\"\nservice_port = 8080\n\n[[relay]]\nname = \"b\"\nport = 1\nservice_port = 99999\n";
        let err = parse_toml::<Loose>(text, "agent.toml").unwrap_err();
        let lines: Vec<String> = err.to_string().lines().map(str::to_string).collect();
        assert_eq!(lines.len(), 3, "{err}");
        assert_eq!(
            lines[0],
            "agent.toml:3:1: [tunnel].adress: unknown field \"adress\" — fix: remove it, or check its spelling and the table it is in (see the example config)"
        );
        assert!(
            lines[1].starts_with("agent.toml:11:1: [[relay]][1].port: unknown field \"port\""),
            "{}",
            lines[1]
        );
        assert!(lines[2].starts_with("agent.toml:12:16: [[relay]][1].service_port: invalid value: found integer `99999`, expected a whole number from 0 to 65535"), "{}", lines[2]);
    }

    #[test]
    fn unknown_operation_gets_the_list_of_operations_as_fix() {
        let text = "[tunnel]\naddress = \"x\"\n[policy]\noperations = [\"Converse\", \"InvokeModel\", \"Invoke\"]\n";
        let problem = sole_problem(text, "relay.toml");
        assert_eq!(problem.field, "[policy].operations[2]");
        assert_eq!(problem.message, "unknown operation \"Invoke\"");
        assert!(
            problem
                .fix
                .starts_with("use one of InvokeModel, InvokeModelWithResponseStream, Converse"),
            "{}",
            problem.fix
        );
        assert_eq!(problem.location.map(|l| l.line), Some(4));
    }

    #[test]
    fn unknown_enum_value_lists_the_choices() {
        let text = "[tunnel]\naddress = \"x\"\nmode = \"kernal\"\n";
        assert_explained(
            text,
            "[tunnel].mode",
            "unknown value \"kernal\"",
            "use one of: kernel, userspace",
        );
    }

    #[test]
    fn missing_field_names_the_field_to_add() {
        let text = "[tunnel]\nmtu = 1400\n";
        assert_explained(
            text,
            "[tunnel].address",
            "required field is missing",
            "add `address = …` to [tunnel] (see the example config)",
        );
    }

    #[test]
    fn missing_or_mistyped_table_is_named_as_a_table() {
        let err = parse_toml::<Loose>("", "agent.toml").unwrap_err();
        assert_eq!(
            err.to_string(),
            "agent.toml:1:1: tunnel: required field is missing — fix: add `tunnel = …` or a [tunnel] table (see the example config)"
        );
        let err = parse_toml::<Loose>("tunnel = 3\n", "agent.toml").unwrap_err();
        assert_eq!(
            err.to_string(),
            "agent.toml:1:10: tunnel: wrong type: found integer `3`, expected a table — fix: give a table"
        );
        let text = "[tunnel]\naddress = \"x\"\n[policy]\noperations = \"Converse\"\n";
        let problem = first_problem(text, "relay.toml");
        assert_eq!(
            problem.message,
            "wrong type: found string \"Converse\", expected a list"
        );
        assert_eq!(problem.fix, "give a list, e.g. [\"a\", \"b\"]");
    }

    #[test]
    fn deny_unknown_fields_message_lists_the_known_fields() {
        let text = "[admin]\nlisten = \"127.0.0.1:9100\"\nlisen = \"x\"\n";
        let err = parse_toml::<Strict>(text, "agent.toml").unwrap_err();
        assert_eq!(err.len(), 1, "{err}");
        let problem = &err.problems()[0];
        assert_eq!(problem.field, "[admin].lisen");
        assert_eq!(problem.message, "unknown field \"lisen\"");
        assert_eq!(problem.fix, "remove it, or use one of: listen, token");
        assert_eq!(problem.location.map(|l| l.line), Some(3));
    }

    #[test]
    fn syntax_error_has_position_and_no_field() {
        let text = "[tunnel]\naddress = \"x\nmtu = 3\n";
        let problem = sole_problem(text, "agent.toml");
        assert_eq!(problem.field, "");
        assert_eq!(problem.location.map(|l| l.line), Some(2));
        assert_eq!(problem.fix, "correct the TOML syntax there");
    }

    #[test]
    fn validation_problems_get_located_from_their_field() {
        let text = "[tunnel]\naddress = \"x\"\n\n[[relay]]\nname = \"a\"\n\n[[relay]]\nname = \"b\"\nservice_port = 0\n\n[policy]\noperations = [\"Converse\",\n  \"Bogus\"]\n";
        let mut diagnostics = Diagnostics::new("relay.toml");
        diagnostics.push("[[relay]][1].service_port", "port 0", "use 1-65535");
        diagnostics.push("[policy].operations[1]", "not allowed", "remove it");
        diagnostics.push("[tunnel]", "incomplete", "add mode");
        diagnostics.push("[front].cert_file", "missing", "add it");
        diagnostics.push("", "whole file", "rewrite");
        diagnostics.locate_in(text);
        let lines: Vec<Option<usize>> = diagnostics
            .problems()
            .iter()
            .map(|problem| problem.location.map(|at| at.line))
            .collect();
        assert_eq!(lines, [Some(9), Some(13), Some(1), None, None]);
        assert!(diagnostics
            .to_string()
            .starts_with("relay.toml:9:1: [[relay]][1].service_port: port 0"));
    }

    #[test]
    fn field_names_read_back() {
        assert_eq!(
            parse_field("[[relay]][0].endpoint"),
            Some(vec![
                Step::Key("relay".into()),
                Step::Index(0),
                Step::Key("endpoint".into())
            ])
        );
        assert_eq!(
            parse_field("[policy].operations[2]"),
            Some(vec![
                Step::Key("policy".into()),
                Step::Key("operations".into()),
                Step::Index(2)
            ])
        );
        assert_eq!(parse_field("top"), Some(vec![Step::Key("top".into())]));
        assert_eq!(parse_field(""), None);
        assert_eq!(parse_field("[policy].operations[x]"), None);
        assert_eq!(parse_field("[policy"), None);
    }

    #[test]
    fn read_toml_reports_a_missing_file() {
        let err = read_toml::<Loose>("/nonexistent/xpart/agent.toml").unwrap_err();
        assert_eq!(err.len(), 1);
        let line = err.to_string();
        assert!(
            line.starts_with("/nonexistent/xpart/agent.toml: cannot read the file:"),
            "{line}"
        );
        assert!(
            line.ends_with("— fix: check the path given to --config"),
            "{line}"
        );
    }

    #[test]
    fn read_toml_reads_a_file() {
        let dir = std::env::temp_dir().join(format!("xpart-daemon-config-{}", std::process::id()));
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join("agent.toml");
        std::fs::write(&path, "[tunnel]\naddress = \"100.64.0.1/30\"\n").unwrap();
        let config: Loose = read_toml(&path).unwrap();
        assert_eq!(config.tunnel.address, "100.64.0.1/30");
        std::fs::remove_dir_all(&dir).unwrap();
    }

    #[test]
    fn diagnostics_collect_validation_problems() {
        let mut diagnostics = Diagnostics::new("agent.toml");
        assert!(diagnostics.clone().into_result(1).is_ok());
        diagnostics.push(
            "[front].cert_file",
            "no such file \"/x\"",
            "run `xpart ca issue`",
        );
        diagnostics.push(
            "",
            "the file is empty",
            "start from config/agent.example.toml",
        );
        assert_eq!(diagnostics.len(), 2);
        assert_eq!(
            diagnostics.into_result(1).unwrap_err().to_string(),
            "agent.toml: [front].cert_file: no such file \"/x\" — fix: run `xpart ca issue`\nagent.toml: the file is empty — fix: start from config/agent.example.toml"
        );
    }
}
