//! Reading a service's Prometheus `/metrics`: the sum and count of a
//! histogram's series, so a scenario can split its end-to-end time into the
//! worker's own phases (Pulumi run, handler, publish-to-ack).

use anyhow::Context;

/// The `/metrics` text at `base`.
pub async fn fetch(http: &reqwest::Client, base: &str) -> anyhow::Result<String> {
    http.get(format!("{base}/metrics"))
        .send()
        .await
        .and_then(|r| r.error_for_status())
        .with_context(|| format!("scraping {base}/metrics"))?
        .text()
        .await
        .with_context(|| format!("reading {base}/metrics"))
}

/// Sum over the series of `name` whose labels include every `(key, value)`.
pub fn sum(text: &str, name: &str, labels: &[(&str, &str)]) -> f64 {
    text.lines()
        .filter(|l| !l.starts_with('#'))
        .filter_map(|l| {
            let (series, value) = l.rsplit_once(' ')?;
            let (metric, rest) = match series.split_once('{') {
                Some((m, rest)) => (m, rest.trim_end_matches('}')),
                None => (series, ""),
            };
            if metric != name {
                return None;
            }
            let all = labels
                .iter()
                .all(|(k, v)| rest.split(',').any(|kv| kv == format!("{k}=\"{v}\"")));
            all.then(|| value.parse::<f64>().ok()).flatten()
        })
        .sum()
}

/// The mean of histogram `name` (seconds) between two scrapes, in
/// milliseconds, and how many observations it covers.
pub fn mean_ms(before: &str, after: &str, name: &str, labels: &[(&str, &str)]) -> (f64, u64) {
    let s =
        sum(after, &format!("{name}_sum"), labels) - sum(before, &format!("{name}_sum"), labels);
    let c = sum(after, &format!("{name}_count"), labels)
        - sum(before, &format!("{name}_count"), labels);
    if c <= 0.0 {
        return (f64::NAN, 0);
    }
    (s / c * 1e3, c as u64)
}

#[cfg(test)]
mod tests {
    use super::*;

    const BEFORE: &str = "# HELP x\ncm_pulumi_duration_seconds_sum{phase=\"up\",outcome=\"ok\"} 1.0\ncm_pulumi_duration_seconds_count{phase=\"up\",outcome=\"ok\"} 1\n";
    const AFTER: &str = "# HELP x\ncm_pulumi_duration_seconds_sum{phase=\"up\",outcome=\"ok\"} 4.0\ncm_pulumi_duration_seconds_count{phase=\"up\",outcome=\"ok\"} 4\ncm_pulumi_duration_seconds_sum{phase=\"destroy\",outcome=\"ok\"} 9.0\ncm_pulumi_duration_seconds_count{phase=\"destroy\",outcome=\"ok\"} 1\nplain 3\n";

    #[test]
    fn sums_matching_series() {
        assert_eq!(
            sum(AFTER, "cm_pulumi_duration_seconds_sum", &[("phase", "up")]),
            4.0
        );
        assert_eq!(sum(AFTER, "cm_pulumi_duration_seconds_sum", &[]), 13.0);
        assert_eq!(sum(AFTER, "plain", &[]), 3.0);
        assert_eq!(sum(AFTER, "absent", &[]), 0.0);
    }

    #[test]
    fn mean_between_scrapes() {
        let (mean, n) = mean_ms(
            BEFORE,
            AFTER,
            "cm_pulumi_duration_seconds",
            &[("phase", "up")],
        );
        assert_eq!(n, 3);
        assert!((mean - 1000.0).abs() < 1e-9);
        let (none, zero) = mean_ms(AFTER, AFTER, "cm_pulumi_duration_seconds", &[]);
        assert!(none.is_nan());
        assert_eq!(zero, 0);
    }
}
