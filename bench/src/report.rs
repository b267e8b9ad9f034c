//! The result table: one [`Row`] per measurement (name, n, p50, p99, unit,
//! target, verdict, ratio), judged against its target, rendered as text and
//! serialised as JSON.

use std::fmt::Write as _;

use serde::Serialize;

use crate::stats;

/// Which number of a row a target bounds.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
#[serde(rename_all = "lowercase")]
pub enum Stat {
    /// The median (or the single value of a one-number row).
    P50,
    P99,
    /// The row's ratio.
    Ratio,
}

/// An upper bound on one number of a row.
#[derive(Debug, Clone, Copy, PartialEq, Serialize)]
pub struct Check {
    pub stat: Stat,
    pub max: f64,
}

/// Whether a row met its target.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize)]
pub enum Verdict {
    #[serde(rename = "met")]
    Met,
    #[serde(rename = "missed")]
    Missed,
    /// No target, or a number the target needs is missing.
    #[serde(rename = "-")]
    NoTarget,
}

impl Verdict {
    fn as_str(self) -> &'static str {
        match self {
            Self::Met => "met",
            Self::Missed => "missed",
            Self::NoTarget => "-",
        }
    }
}

/// One measurement.
#[derive(Debug, Clone, Serialize)]
pub struct Row {
    /// Stable identifier (`create.e2e`, `rss.idle.cm-api`, ...).
    pub id: String,
    /// What was measured, for people.
    pub name: String,
    /// Samples behind the numbers.
    pub n: usize,
    pub p50: f64,
    pub p99: Option<f64>,
    pub unit: String,
    pub target: Vec<Check>,
    /// The target as printed (`p50<=5ms, p99<=20ms`).
    pub target_text: String,
    pub verdict: Verdict,
    pub ratio: Option<f64>,
    /// What the ratio divides by.
    pub ratio_of: Option<String>,
    pub note: Option<String>,
}

impl Row {
    /// A latency row from samples in milliseconds.
    pub fn latency(id: &str, name: &str, samples_ms: &[f64]) -> Self {
        Self::samples(id, name, samples_ms, "ms")
    }

    /// A row from samples in `unit`.
    pub fn samples(id: &str, name: &str, samples: &[f64], unit: &str) -> Self {
        let mut row = Self::value(id, name, stats::p50(samples), unit);
        row.n = samples.len();
        row.p99 = Some(stats::p99(samples));
        row
    }

    /// A one-number row.
    pub fn value(id: &str, name: &str, value: f64, unit: &str) -> Self {
        Self {
            id: id.to_owned(),
            name: name.to_owned(),
            n: 1,
            p50: value,
            p99: None,
            unit: unit.to_owned(),
            target: Vec::new(),
            target_text: String::new(),
            verdict: Verdict::NoTarget,
            ratio: None,
            ratio_of: None,
            note: None,
        }
    }

    /// Sets how many samples (or items) the numbers stand for.
    pub fn n(mut self, n: usize) -> Self {
        self.n = n;
        self
    }

    /// Adds an upper bound `stat <= max` to the target.
    pub fn at_most(mut self, stat: Stat, max: f64) -> Self {
        self.target.push(Check { stat, max });
        self.judge()
    }

    /// Sets the ratio and what it divides by.
    pub fn ratio(mut self, ratio: f64, of: &str) -> Self {
        self.ratio = Some(ratio);
        self.ratio_of = Some(of.to_owned());
        self.judge()
    }

    pub fn note(mut self, note: impl Into<String>) -> Self {
        self.note = Some(note.into());
        self
    }

    fn judge(mut self) -> Self {
        self.target_text = self
            .target
            .iter()
            .map(|c| match c.stat {
                Stat::P50 if self.p99.is_none() => format!("<={}{}", num(c.max), self.unit),
                Stat::P50 => format!("p50<={}{}", num(c.max), self.unit),
                Stat::P99 => format!("p99<={}{}", num(c.max), self.unit),
                Stat::Ratio => format!("ratio<={}x", num(c.max)),
            })
            .collect::<Vec<_>>()
            .join(", ");
        self.verdict = verdict(&self);
        self
    }

    fn stat(&self, stat: Stat) -> Option<f64> {
        match stat {
            Stat::P50 => Some(self.p50),
            Stat::P99 => self.p99,
            Stat::Ratio => self.ratio,
        }
        .filter(|v| v.is_finite())
    }
}

fn verdict(row: &Row) -> Verdict {
    if row.target.is_empty() {
        return Verdict::NoTarget;
    }
    let mut met = true;
    for check in &row.target {
        match row.stat(check.stat) {
            Some(v) => met &= v <= check.max,
            None => return Verdict::NoTarget,
        }
    }
    if met { Verdict::Met } else { Verdict::Missed }
}

/// A number with as many decimals as its size deserves.
pub fn num(v: f64) -> String {
    if !v.is_finite() {
        return "-".into();
    }
    let a = v.abs();
    if a >= 100.0 || a == a.trunc() {
        format!("{v:.0}")
    } else if a >= 10.0 {
        format!("{v:.1}")
    } else {
        format!("{v:.2}")
    }
}

/// Every row and note of a run.
#[derive(Debug, Default, Serialize)]
pub struct Report {
    pub rows: Vec<Row>,
    /// Findings and caveats printed under the table.
    pub notes: Vec<String>,
}

impl Report {
    pub fn push(&mut self, row: Row) {
        tracing::info!(id = %row.id, p50 = row.p50, p99 = ?row.p99, unit = %row.unit, "measured");
        self.rows.push(row);
    }

    pub fn note(&mut self, note: impl Into<String>) {
        self.notes.push(note.into());
    }

    /// The row with identifier `id`.
    pub fn find(&self, id: &str) -> Option<&Row> {
        self.rows.iter().find(|r| r.id == id)
    }

    /// The table, one line per row, then the notes.
    pub fn render(&self) -> String {
        let header = [
            "name", "n", "p50", "p99", "unit", "target", "verdict", "ratio",
        ];
        let mut cells: Vec<[String; 8]> = vec![header.map(str::to_owned)];
        for r in &self.rows {
            cells.push([
                r.name.clone(),
                r.n.to_string(),
                num(r.p50),
                r.p99.map_or_else(|| "-".into(), num),
                r.unit.clone(),
                if r.target_text.is_empty() {
                    "-".into()
                } else {
                    r.target_text.clone()
                },
                r.verdict.as_str().into(),
                match (&r.ratio, &r.ratio_of) {
                    (Some(v), Some(of)) => format!("{v:.2}x {of}"),
                    (Some(v), None) => format!("{v:.2}x"),
                    _ => "-".into(),
                },
            ]);
        }
        let mut widths = [0usize; 8];
        for row in &cells {
            for (w, c) in widths.iter_mut().zip(row) {
                *w = (*w).max(c.chars().count());
            }
        }
        let mut out = String::new();
        for (i, row) in cells.iter().enumerate() {
            let mut line = String::new();
            for (col, (c, w)) in row.iter().zip(widths).enumerate() {
                // Names, units, targets and verdicts left; numbers right.
                let pad = w.saturating_sub(c.chars().count());
                if matches!(col, 1..=3) {
                    line.push_str(&" ".repeat(pad));
                    line.push_str(c);
                } else {
                    line.push_str(c);
                    if col != 7 {
                        line.push_str(&" ".repeat(pad));
                    }
                }
                if col != 7 {
                    line.push_str("  ");
                }
            }
            let _ = writeln!(out, "{}", line.trim_end());
            if i == 0 {
                let total = widths.iter().sum::<usize>() + 2 * 7;
                let _ = writeln!(out, "{}", "-".repeat(total));
            }
        }
        let notes: Vec<String> = self
            .rows
            .iter()
            .filter_map(|r| r.note.as_ref().map(|n| format!("{}: {n}", r.name)))
            .chain(self.notes.iter().cloned())
            .collect();
        if !notes.is_empty() {
            out.push_str("\nnotes:\n");
            for n in notes {
                let _ = writeln!(out, "- {n}");
            }
        }
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn verdicts_follow_targets() {
        let met = Row::latency("a", "a", &[1.0, 2.0, 3.0])
            .at_most(Stat::P50, 5.0)
            .at_most(Stat::P99, 20.0);
        assert_eq!(met.verdict, Verdict::Met);
        assert_eq!(met.target_text, "p50<=5ms, p99<=20ms");

        let missed = Row::latency("b", "b", &[1.0, 2.0, 30.0])
            .at_most(Stat::P50, 5.0)
            .at_most(Stat::P99, 20.0);
        assert_eq!(missed.verdict, Verdict::Missed);

        let none = Row::latency("c", "c", &[1.0]);
        assert_eq!(none.verdict, Verdict::NoTarget);

        // A ratio target without a ratio cannot be judged.
        let unknown = Row::latency("d", "d", &[1.0]).at_most(Stat::Ratio, 1.15);
        assert_eq!(unknown.verdict, Verdict::NoTarget);
        let judged = unknown.ratio(1.2, "raw");
        assert_eq!(judged.verdict, Verdict::Missed);
        assert_eq!(judged.target_text, "ratio<=1.15x");
    }

    #[test]
    fn value_rows_print_a_bare_bound() {
        let row = Row::value("rss", "rss", 12.5, "MiB").at_most(Stat::P50, 30.0);
        assert_eq!(row.target_text, "<=30MiB");
        assert_eq!(row.verdict, Verdict::Met);
        assert_eq!(row.p99, None);
    }

    #[test]
    fn table_has_every_column_and_the_notes() {
        let mut report = Report::default();
        report.push(
            Row::latency("x", "pool claim", &[6.0, 7.0])
                .at_most(Stat::P50, 5.0)
                .ratio(1.5, "vs raw"),
        );
        report.push(Row::value("y", "rss idle", 9.0, "MiB").note("VmHWM 11 MiB"));
        report.note("machine shared");
        let text = report.render();
        let lines: Vec<&str> = text.lines().collect();
        for col in [
            "name", "n", "p50", "p99", "unit", "target", "verdict", "ratio",
        ] {
            assert!(lines[0].contains(col), "{col} missing from {}", lines[0]);
        }
        assert!(lines[2].starts_with("pool claim"));
        assert!(lines[2].contains("missed"), "{}", lines[2]);
        assert!(lines[2].contains("1.50x vs raw"), "{}", lines[2]);
        assert!(lines[3].contains(" - "), "{}", lines[3]);
        assert!(text.contains("- rss idle: VmHWM 11 MiB"));
        assert!(text.contains("- machine shared"));
    }

    #[test]
    fn numbers_keep_useful_precision() {
        assert_eq!(num(1234.4), "1234");
        assert_eq!(num(12.34), "12.3");
        assert_eq!(num(1.234), "1.23");
        assert_eq!(num(30.0), "30");
        assert_eq!(num(f64::NAN), "-");
    }
}
