//! How results reach stdout: aligned tables for people (`--output table`,
//! the default) or one JSON document for scripts (`--output json`).
//!
//! Every command builds both forms of its result and hands them to
//! [`Printer::emit`]; nothing else writes to stdout. Instance flags are
//! removed from everything printed unless `--show-flags` is given.

use std::io::Write;

use serde_json::Value;

/// `--output`.
#[derive(Debug, Clone, Copy, PartialEq, Eq, clap::ValueEnum)]
pub enum Format {
    /// Aligned columns for people.
    Table,
    /// One JSON document.
    Json,
}

/// The human-readable form of a result.
#[derive(Debug, Clone)]
pub enum View {
    /// Columns with a header row.
    Table {
        headers: Vec<&'static str>,
        rows: Vec<Vec<String>>,
    },
    /// `key  value` lines, keys aligned.
    Fields(Vec<(String, String)>),
    /// Free text, printed as it is.
    Text(String),
    /// Several views, separated by a blank line.
    Sections(Vec<View>),
}

impl View {
    /// Renders the view as lines of text (each ending with a newline).
    pub fn render(&self) -> String {
        match self {
            View::Table { headers, rows } => {
                let head: Vec<String> = headers.iter().map(|h| (*h).to_owned()).collect();
                let mut all = vec![head];
                all.extend(rows.iter().cloned());
                align(&all)
            }
            View::Fields(fields) => {
                let rows: Vec<Vec<String>> = fields
                    .iter()
                    .map(|(k, v)| vec![k.clone(), v.clone()])
                    .collect();
                align(&rows)
            }
            View::Text(text) if text.ends_with('\n') || text.is_empty() => text.clone(),
            View::Text(text) => format!("{text}\n"),
            View::Sections(views) => views
                .iter()
                .map(View::render)
                .filter(|s| !s.is_empty())
                .collect::<Vec<_>>()
                .join("\n"),
        }
    }
}

/// Columns padded to their widest cell, two spaces apart, no trailing blanks.
fn align(rows: &[Vec<String>]) -> String {
    let columns = rows.iter().map(Vec::len).max().unwrap_or(0);
    let mut widths = vec![0; columns];
    for row in rows {
        for (i, cell) in row.iter().enumerate() {
            widths[i] = widths[i].max(cell.chars().count());
        }
    }
    let mut out = String::new();
    for row in rows {
        let mut line = String::new();
        for (i, cell) in row.iter().enumerate() {
            // Cells never span lines: a newline in a value would break the columns.
            let cell = cell.replace(['\r', '\n'], " ");
            line.push_str(&cell);
            if i + 1 < row.len() {
                let pad = widths[i] - cell.chars().count() + 2;
                line.extend(std::iter::repeat_n(' ', pad));
            }
        }
        out.push_str(line.trim_end());
        out.push('\n');
    }
    out
}

/// Writes results in the chosen format.
#[derive(Debug, Clone, Copy)]
pub struct Printer {
    pub format: Format,
    pub show_flags: bool,
}

impl Printer {
    /// Prints `json` or `view`, as `--output` says. A closed stdout (a pipe
    /// into `head`) is not an error.
    pub fn emit(&self, json: Value, view: impl FnOnce() -> View) {
        let text = match self.format {
            Format::Json => {
                let json = if self.show_flags {
                    json
                } else {
                    strip_flags(json)
                };
                let mut s = serde_json::to_string_pretty(&json).unwrap_or_else(|_| "null".into());
                s.push('\n');
                s
            }
            Format::Table => view().render(),
        };
        let mut stdout = std::io::stdout().lock();
        let _ = stdout.write_all(text.as_bytes());
        let _ = stdout.flush();
    }
}

/// Removes every `flag` and `flags` member, at any depth.
pub fn strip_flags(value: Value) -> Value {
    match value {
        Value::Object(map) => Value::Object(
            map.into_iter()
                .filter(|(k, _)| k != "flag" && k != "flags")
                .map(|(k, v)| (k, strip_flags(v)))
                .collect(),
        ),
        Value::Array(items) => Value::Array(items.into_iter().map(strip_flags).collect()),
        other => other,
    }
}

/// A JSON member as table text: strings bare, absent as `-`.
pub fn cell(value: &Value, key: &str) -> String {
    match value.get(key) {
        None | Some(Value::Null) => "-".into(),
        Some(Value::String(s)) if s.is_empty() => "-".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// A JSON number member (int64 may come as a string) as table text, `0` when absent.
pub fn count(value: &Value, key: &str) -> String {
    match value.get(key) {
        None | Some(Value::Null) => "0".into(),
        Some(Value::String(s)) => s.clone(),
        Some(other) => other.to_string(),
    }
}

/// A string map member as `k=v,k=v` (sorted), `-` when empty.
pub fn pairs(value: &Value, key: &str) -> String {
    let Some(Value::Object(map)) = value.get(key) else {
        return "-".into();
    };
    if map.is_empty() {
        return "-".into();
    }
    let mut items: Vec<String> = map
        .iter()
        .map(|(k, v)| format!("{k}={}", v.as_str().unwrap_or_default()))
        .collect();
    items.sort();
    items.join(",")
}

#[cfg(test)]
mod tests {
    use serde_json::json;

    use super::*;

    #[test]
    fn tables_are_aligned_without_trailing_blanks() {
        let view = View::Table {
            headers: vec!["ID", "SCENARIO"],
            rows: vec![
                vec!["web".into(), "identity".into()],
                vec!["crypto-1".into(), "x".into()],
            ],
        };
        assert_eq!(
            view.render(),
            "ID        SCENARIO\nweb       identity\ncrypto-1  x\n"
        );
    }

    #[test]
    fn flags_are_stripped_at_any_depth() {
        let v = json!({"flag": "f", "instances": [{"flags": ["a"], "sourceId": "s"}]});
        assert_eq!(strip_flags(v), json!({"instances": [{"sourceId": "s"}]}));
    }
}
